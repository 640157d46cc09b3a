//! Which connections want this event.
//!
//! The router holds the open streams of this instance, indexed by project and,
//! inside a project, grouped by registration: identical registrations (the
//! common case: many agents watching the same folder) are matched once per
//! event, not once per connection. For each matching group it asks the
//! authorizer (cached) whether each identity may see this concrete event now,
//! and pushes the one shared encoded frame into the connection's bounded queue.
//!
//! It is independent of the bus that feeds it and of HTTP. `dispatch` never
//! blocks, never awaits, and allocates nothing per connection.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::RwLock;

use crate::event::EventType;
use crate::ident::{EnvSlug, ProjectId};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::path::SecretPath;
use crate::policy::Authorizer;
use crate::stream::{Conn, Frame, Push};

/// An accepted event, encoded once, ready to fan out.
#[derive(Debug)]
pub struct Delivery {
    /// Sequence number, the SSE `id`.
    pub seq: u64,
    /// Project.
    pub project: ProjectId,
    /// Type.
    pub event_type: EventType,
    /// Environment.
    pub env: EnvSlug,
    /// Folder path.
    pub path: SecretPath,
    /// The encoded SSE frame, shared by every receiver.
    pub frame: Bytes,
    /// When herald accepted it.
    pub accepted_at: Instant,
}

impl Delivery {
    /// Encodes `ev` as the SSE frame with id `seq`, once for every receiver.
    pub fn encode(seq: u64, ev: crate::event::Event) -> Delivery {
        Delivery {
            seq,
            frame: crate::sse::event_frame(seq, ev.event_type.name(), &ev.json),
            project: ev.project,
            event_type: ev.event_type,
            env: ev.env,
            path: ev.path,
            accepted_at: Instant::now(),
        }
    }
}

/// Counts of one dispatch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Frames queued.
    pub queued: usize,
    /// Connections that wanted it but may not see it.
    pub denied: usize,
    /// Connections closed as slow consumers by this dispatch.
    pub overflowed: usize,
}

/// The open streams of one project.
#[derive(Default)]
struct ProjectConns {
    by_interest: HashMap<Interest, Vec<Arc<Conn>>>,
    count: usize,
}

/// The open streams of this instance.
pub struct Router {
    projects: RwLock<HashMap<ProjectId, ProjectConns>>,
    authorizer: Arc<Authorizer>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

/// Removes a connection from the router when dropped (held by its stream).
pub struct Registration {
    router: Arc<Router>,
    conn: Arc<Conn>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.router.remove(&self.conn);
    }
}

impl Router {
    /// An empty router.
    pub fn new(authorizer: Arc<Authorizer>, metrics: Arc<Metrics>) -> Self {
        Self {
            projects: RwLock::new(HashMap::new()),
            authorizer,
            metrics,
            next_id: AtomicU64::new(1),
        }
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a connection; it is removed when the returned guard is dropped.
    pub fn add(self: &Arc<Self>, conn: Arc<Conn>) -> Registration {
        let mut map = self.projects.write();
        let pc = map.entry(conn.project.clone()).or_default();
        for i in conn.interests.iter() {
            pc.by_interest
                .entry(i.clone())
                .or_default()
                .push(conn.clone());
        }
        pc.count += 1;
        Registration {
            router: self.clone(),
            conn,
        }
    }

    fn remove(&self, conn: &Arc<Conn>) {
        let mut map = self.projects.write();
        let Some(pc) = map.get_mut(&conn.project) else {
            return;
        };
        for i in conn.interests.iter() {
            if let Some(v) = pc.by_interest.get_mut(i) {
                v.retain(|c| c.id != conn.id);
                if v.is_empty() {
                    pc.by_interest.remove(i);
                }
            }
        }
        pc.count -= 1;
        if pc.count == 0 {
            map.remove(&conn.project);
        }
    }

    /// Whether `conn` wants this delivery and its identity may see it now.
    pub fn admits(&self, conn: &Conn, d: &Delivery) -> bool {
        conn.wants(d.event_type, &d.env, &d.path)
            && self
                .authorizer
                .may_receive(&conn.subject, &d.project, d.event_type, &d.env, &d.path)
    }

    /// Fans one delivery out to every connection that wants it and may see it.
    pub fn dispatch(&self, d: &Arc<Delivery>) -> DispatchStats {
        let mut stats = DispatchStats::default();
        // Read before deciding: a frame is never tagged newer than its decision.
        let generation = self.authorizer.generation();
        let map = self.projects.read();
        let Some(pc) = map.get(&d.project) else {
            return stats;
        };
        let segs = d.path.split();
        // Consecutive connections of one identity share one decision.
        let mut last: Option<(&Arc<str>, bool)> = None;
        for (interest, conns) in &pc.by_interest {
            if !interest.matches_split(d.event_type, &d.env, &segs) {
                continue;
            }
            for conn in conns {
                if !conn.mark_dispatched(d.seq) {
                    continue; // another of its registrations matched already
                }
                let allowed = match last {
                    Some((s, v)) if Arc::ptr_eq(s, &conn.subject) || **s == *conn.subject => v,
                    _ => {
                        let v = self.authorizer.may_receive(
                            &conn.subject,
                            &d.project,
                            d.event_type,
                            &d.env,
                            &d.path,
                        );
                        last = Some((&conn.subject, v));
                        v
                    }
                };
                if !allowed {
                    stats.denied += 1;
                    continue;
                }
                let frame = Frame {
                    delivery: d.clone(),
                    generation,
                };
                match conn.push(frame) {
                    Push::Queued => stats.queued += 1,
                    Push::Overflow => stats.overflowed += 1,
                    Push::Closed => {}
                }
            }
        }
        if stats.denied > 0 {
            self.metrics
                .permission_denied
                .with_label_values(&["delivery"])
                .inc_by(stats.denied as u64);
        }
        stats
    }

    /// Every open connection (admin view, drain, policy re-check).
    pub fn connections(&self) -> Vec<Arc<Conn>> {
        let map = self.projects.read();
        let mut seen = HashSet::new();
        map.values()
            .flat_map(|pc| pc.by_interest.values().flatten())
            .filter(|c| seen.insert(c.id))
            .cloned()
            .collect()
    }

    /// Number of open connections.
    pub fn len(&self) -> usize {
        self.projects.read().values().map(|pc| pc.count).sum()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.projects.read().is_empty()
    }
}
