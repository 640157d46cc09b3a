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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::Notify;

use crate::delivery::Delivery;
use crate::ident::{Principal, ProjectId};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::policy::{Authorizer, PolicySet};
use crate::protocol::Close;
use crate::stream::{Push, Queued, StreamHandle};

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

/// Connections with one registration: dense for iteration on every event,
/// O(1) removal (a swap with the last one) when a stream closes.
#[derive(Default)]
struct ConnSet {
    items: Vec<Arc<StreamHandle>>,
    position: HashMap<u64, usize>,
}

impl ConnSet {
    fn insert(&mut self, conn: Arc<StreamHandle>) {
        self.position.insert(conn.id, self.items.len());
        self.items.push(conn);
    }

    fn remove(&mut self, id: u64) {
        let Some(i) = self.position.remove(&id) else {
            return;
        };
        self.items.swap_remove(i);
        if let Some(moved) = self.items.get(i) {
            self.position.insert(moved.id, i);
        }
    }
}

/// The streams of one project that share one registration, matched once per
/// event for all of them.
struct Group {
    interest: Interest,
    conns: RwLock<ConnSet>,
}

/// The open streams of one project.
#[derive(Default)]
struct ProjectConns {
    by_interest: HashMap<Interest, Arc<Group>>,
    /// The groups, as dispatch reads them: replaced (not changed) when a group
    /// comes or goes, so a dispatch takes it with one `Arc` clone and matches
    /// every registration without holding any lock.
    groups: Arc<[Arc<Group>]>,
    count: usize,
}

impl ProjectConns {
    fn refresh_groups(&mut self) {
        self.groups = self.by_interest.values().cloned().collect();
    }
}

/// The open streams of this instance.
pub struct Router {
    projects: RwLock<HashMap<ProjectId, ProjectConns>>,
    authorizer: Arc<Authorizer>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    /// Open streams, and a notice when the last one goes (the drain waits
    /// on it instead of polling).
    open: AtomicUsize,
    emptied: Notify,
}

/// Removes a connection from the router when dropped (held by its stream).
pub struct Registration {
    router: Arc<Router>,
    conn: Arc<StreamHandle>,
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
            open: AtomicUsize::new(0),
            emptied: Notify::new(),
        }
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The registration an open stream of `project` already holds that equals
    /// `interest`, so that a new stream shares it instead of keeping a copy;
    /// `interest` itself when there is none.
    pub fn shared_interest(&self, project: &ProjectId, interest: Interest) -> Interest {
        let map = self.projects.read();
        match map
            .get(project)
            .and_then(|pc| pc.by_interest.get(&interest))
        {
            Some(g) => g.interest.clone(),
            None => interest,
        }
    }

    /// Adds a connection; it is removed when the returned guard is dropped.
    pub fn add(self: &Arc<Self>, conn: Arc<StreamHandle>) -> Registration {
        let mut map = self.projects.write();
        let pc = map.entry(conn.project.clone()).or_default();
        let mut new_group = false;
        for i in conn.interests.iter() {
            let group = pc.by_interest.entry(i.clone()).or_insert_with(|| {
                new_group = true;
                Arc::new(Group {
                    interest: i.clone(),
                    conns: RwLock::new(ConnSet::default()),
                })
            });
            group.conns.write().insert(conn.clone());
        }
        if new_group {
            pc.refresh_groups();
        }
        pc.count += 1;
        self.open.fetch_add(1, Ordering::AcqRel);
        Registration {
            router: self.clone(),
            conn,
        }
    }

    fn remove(&self, conn: &Arc<StreamHandle>) {
        let mut map = self.projects.write();
        let Some(pc) = map.get_mut(&conn.project) else {
            return;
        };
        let mut gone_group = false;
        for i in conn.interests.iter() {
            if let Some(g) = pc.by_interest.get(i) {
                let mut set = g.conns.write();
                set.remove(conn.id);
                if set.items.is_empty() {
                    drop(set);
                    pc.by_interest.remove(i);
                    gone_group = true;
                }
            }
        }
        if gone_group {
            pc.refresh_groups();
        }
        pc.count -= 1;
        if pc.count == 0 {
            map.remove(&conn.project);
        }
        drop(map);
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_waiters();
        }
    }

    /// Waits until no stream is open.
    pub async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            // Registered before looking, so a last stream leaving in between
            // is not missed.
            emptied.as_mut().enable();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }

    /// Closes every stream a registration of which `set` no longer allows
    /// (`permission_revoked`, naming it); returns how many.
    pub fn revoke_disallowed(&self, set: &PolicySet) -> usize {
        let mut revoked = 0;
        for conn in self.connections() {
            let denied = conn
                .interests
                .iter()
                .enumerate()
                .find(|(_, it)| !set.may_subscribe(&conn.identity, &conn.project, it));
            if let Some((i, it)) = denied {
                if conn.close(Close::PermissionRevoked(format!("register[{i}]: {it}"))) {
                    revoked += 1;
                }
            }
        }
        revoked
    }

    /// The policy generation in force (tagged on queued events).
    pub fn policy_generation(&self) -> u64 {
        self.authorizer.generation()
    }

    /// Whether `conn` may be sent this delivery: the one predicate of every
    /// delivery path (live, and replay on each bus). The event is of the
    /// stream's project, a registration wants it, and the identity may see it
    /// under the policy in force now.
    pub fn admits(&self, conn: &StreamHandle, d: &Delivery) -> bool {
        d.key().project == conn.project
            && conn.wants(d.key())
            && self.authorizer.may_receive(&conn.identity, d.key())
    }

    /// Fans one delivery out to every connection that wants it and may see it.
    pub fn dispatch(&self, d: &Arc<Delivery>) -> DispatchStats {
        let mut stats = DispatchStats::default();
        // Read before deciding: a frame is never tagged newer than its decision.
        let generation = self.authorizer.generation();
        let Some(groups) = self
            .projects
            .read()
            .get(&d.key().project)
            .map(|pc| pc.groups.clone())
        else {
            return stats;
        };
        let segs = d.key().path.split();
        // Consecutive connections of one identity share one decision.
        let mut last: Option<(Principal, bool)> = None;
        for group in groups.iter() {
            // Matched with no lock held: publishes and subscribes wait on
            // nothing while registrations are compared with the event.
            if !group.interest.matches_split(d.key(), &segs) {
                continue;
            }
            let set = group.conns.read();
            for conn in &set.items {
                if !conn.mark_dispatched(d.seq) {
                    continue; // another of its registrations matched already
                }
                let allowed = match &last {
                    Some((who, v)) if *who == conn.identity => *v,
                    _ => {
                        let v = self.authorizer.may_receive(&conn.identity, d.key());
                        last = Some((conn.identity.clone(), v));
                        v
                    }
                };
                if !allowed {
                    stats.denied += 1;
                    continue;
                }
                let frame = Queued {
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
    pub fn connections(&self) -> Vec<Arc<StreamHandle>> {
        let map = self.projects.read();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for pc in map.values() {
            for g in pc.by_interest.values() {
                for c in g.conns.read().items.iter() {
                    if seen.insert(c.id) {
                        out.push(c.clone());
                    }
                }
            }
        }
        out
    }

    /// Number of open streams.
    pub fn len(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::tests::delivery as event;
    use crate::event::EventType;
    use crate::path::PathPattern;
    use crate::policy::PolicySource;
    use crate::stream::{new_stream, SseStream, StreamSettings, Subscriber};

    async fn router() -> (Arc<Router>, Arc<Authorizer>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let mut src = PolicySource::shipped();
        src.policy = "p, a, *, *, subscribe, *, /**, allow\n".into();
        let auth = Arc::new(Authorizer::new(&src, 100, metrics.clone()).await.unwrap());
        (
            Arc::new(Router::new(auth.clone(), metrics.clone())),
            auth,
            metrics,
        )
    }

    fn open(
        r: &Arc<Router>,
        auth: &Arc<Authorizer>,
        m: &Arc<Metrics>,
        path: &str,
    ) -> (Arc<StreamHandle>, SseStream) {
        let settings = StreamSettings::for_tests(crate::protocol::Dialect::Native);
        let who = Subscriber {
            id: r.next_conn_id(),
            identity: Principal::parse("a").unwrap(),
            project: ProjectId::parse("p1").unwrap(),
            interests: vec![Interest {
                event_type: EventType::parse("secret:created").unwrap(),
                env: None,
                path: PathPattern::parse_subscription(path).unwrap(),
            }],
        };
        let (conn, mut stream) = new_stream(who, &settings, None, auth.clone(), m.clone());
        stream.hold(Box::new(r.add(conn.clone())));
        (conn, stream)
    }

    fn delivery(seq: u64, path: &str) -> Arc<Delivery> {
        event(seq, "p1", path)
    }

    #[tokio::test]
    async fn streams_leave_their_groups_when_they_close() {
        let (r, auth, m) = router().await;
        let (_a, sa) = open(&r, &auth, &m, "/apps");
        let (_b, sb) = open(&r, &auth, &m, "/apps");
        let (_c, sc) = open(&r, &auth, &m, "/apps");
        let (_d, sd) = open(&r, &auth, &m, "/other");
        assert_eq!(r.len(), 4);
        assert_eq!(r.dispatch(&delivery(1, "/apps/x")).queued, 3);
        drop(sb); // the middle of its group
        assert_eq!(r.dispatch(&delivery(2, "/apps/x")).queued, 2);
        drop(sa);
        drop(sc);
        assert_eq!(r.dispatch(&delivery(3, "/apps/x")).queued, 0);
        assert_eq!(r.dispatch(&delivery(4, "/other")).queued, 1);
        drop(sd);
        assert!(r.is_empty());
        assert!(r.connections().is_empty());
    }
}
