//! Instances that see each other over NATS (`{prefix}.sys.presence`).
//!
//! Each instance announces itself every `nats.presence_interval`, and at once
//! (at most every 100 ms) when its streams change: id, version, open streams,
//! policy generation and fingerprint, and its open streams per (identity,
//! project). Peers not heard from for three intervals are forgotten. The
//! announcements feed `/admin/cluster`, the policy-drift metric, and the
//! cluster-wide per-identity stream limit (eventually consistent: a burst of
//! opens on several instances within one announcement can exceed it briefly).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::ident::{Principal, ProjectId};
use crate::limits::Elsewhere;

/// What one instance says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Presence {
    /// Instance id (random per process).
    pub id: String,
    /// herald version.
    pub version: String,
    /// Open streams.
    pub connections: usize,
    /// Policy generation in force.
    pub policy_generation: u64,
    /// Policy fingerprint in force.
    pub policy_fingerprint: String,
    /// Open streams per identity and project: `[identity, project, count]`.
    pub streams: Vec<(String, String, usize)>,
}

struct Peer {
    presence: Presence,
    seen: Instant,
    seen_at: SystemTime,
}

/// The cluster view of one instance.
pub struct Cluster {
    /// This instance's id.
    pub instance_id: String,
    peers: Mutex<HashMap<String, Peer>>,
    interval: Duration,
    changed: Notify,
}

/// Announcements larger than this are ignored (a bound on what a peer can make us parse).
const MAX_PRESENCE_BYTES: usize = 4 * 1024 * 1024;

impl Cluster {
    /// A view with no peers yet.
    pub fn new(instance_id: String, interval: Duration) -> Self {
        Self {
            instance_id,
            peers: Mutex::new(HashMap::new()),
            interval,
            changed: Notify::new(),
        }
    }

    /// The peers heard from recently (older ones are forgotten here).
    fn live_peers(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Peer>> {
        let horizon = self.interval * 3;
        let mut peers = self.peers.lock();
        peers.retain(|_, p| p.seen.elapsed() < horizon);
        peers
    }

    fn live(&self) -> Vec<Presence> {
        self.live_peers()
            .values()
            .map(|p| p.presence.clone())
            .collect()
    }

    /// Streams `identity` has open on other live instances, on `project` and
    /// on every project (asked on every subscribe: counted in place, nothing
    /// copied).
    pub fn streams_elsewhere(&self, identity: &Principal, project: &ProjectId) -> Elsewhere {
        let mut out = Elsewhere::default();
        for (s, pr, n) in self
            .live_peers()
            .values()
            .flat_map(|p| p.presence.streams.iter())
        {
            if s == identity.as_str() {
                out.total = out.total.saturating_add(*n);
                if pr == project.as_str() {
                    out.project = out.project.saturating_add(*n);
                }
            }
        }
        out
    }

    /// Asks for an announcement soon (local streams changed).
    pub fn touch(&self) {
        self.changed.notify_one();
    }

    /// Records a peer's announcement.
    pub fn observe(&self, payload: &[u8]) {
        if payload.len() > MAX_PRESENCE_BYTES {
            return;
        }
        let Ok(p) = serde_json::from_slice::<Presence>(payload) else {
            tracing::debug!("ignored a malformed presence announcement");
            return;
        };
        if p.id == self.instance_id {
            return;
        }
        self.peers.lock().insert(
            p.id.clone(),
            Peer {
                presence: p,
                seen: Instant::now(),
                seen_at: SystemTime::now(),
            },
        );
    }

    /// The admin view: this instance and every live peer, and whether their
    /// policy fingerprints differ.
    pub fn view(&self, me: &Presence) -> serde_json::Value {
        let live = self.live();
        let seen: HashMap<String, SystemTime> = self
            .peers
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.seen_at))
            .collect();
        let fingerprints = self.distinct_fingerprints(me, &live);
        let instances: Vec<serde_json::Value> = std::iter::once((me, None))
            .chain(live.iter().map(|p| (p, seen.get(&p.id).copied())))
            .map(|(p, at)| {
                serde_json::json!({
                    "id": p.id,
                    "self": p.id == me.id,
                    "version": p.version,
                    "connections": p.connections,
                    "policy_generation": p.policy_generation,
                    "policy_fingerprint": p.policy_fingerprint,
                    "last_seen": at.map(|t| time::OffsetDateTime::from(t)
                        .format(&time::format_description::well_known::Rfc3339).unwrap_or_default()),
                })
            })
            .collect();
        serde_json::json!({
            "instance": me.id,
            "instances": instances,
            "distinct_policy_fingerprints": fingerprints,
            "policy_drift": fingerprints > 1,
        })
    }

    fn distinct_fingerprints(&self, me: &Presence, live: &[Presence]) -> usize {
        let set: HashSet<&str> = std::iter::once(me.policy_fingerprint.as_str())
            .chain(live.iter().map(|p| p.policy_fingerprint.as_str()))
            .collect();
        set.len()
    }

    /// Number of live instances including this one, and distinct fingerprints.
    pub fn summary(&self, me: &Presence) -> (usize, usize) {
        let live = self.live();
        (live.len() + 1, self.distinct_fingerprints(me, &live))
    }
}

/// Announces this instance and listens to the others until `stop` resolves.
pub async fn run(
    cluster: Arc<Cluster>,
    client: async_nats::Client,
    prefix: String,
    me: impl Fn() -> Presence + Send + 'static,
    on_summary: impl Fn(usize, usize) + Send + 'static,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let subject = format!("{prefix}.sys.presence");
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to presence announcements");
            return;
        }
    };
    let mut tick = tokio::time::interval(cluster.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut last_sent = Instant::now() - Duration::from_secs(60);
    let mut logged_version = false;
    loop {
        let announce = tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => true,
            _ = cluster.changed.notified() => {
                // Throttle change-driven announcements.
                let wait = Duration::from_millis(100).saturating_sub(last_sent.elapsed());
                tokio::time::sleep(wait).await;
                true
            }
            msg = sub.next() => {
                match msg {
                    Some(m) => cluster.observe(&m.payload),
                    None => return,
                }
                false
            }
        };
        if announce {
            let p = me();
            let (instances, fingerprints) = cluster.summary(&p);
            on_summary(instances, fingerprints);
            if let Ok(body) = serde_json::to_vec(&p) {
                if client.publish(subject.clone(), body.into()).await.is_ok() {
                    last_sent = Instant::now();
                    if !logged_version
                        && client.connection_state() == async_nats::connection::State::Connected
                    {
                        tracing::info!(server_version = %client.server_info().version, "talking to NATS");
                        logged_version = true;
                    }
                }
            }
        }
    }
}

/// Asks for an announcement when dropped (held by a stream: its close changes
/// the counts other instances enforce).
pub struct TouchOnDrop(pub Arc<Cluster>);

impl Drop for TouchOnDrop {
    fn drop(&mut self) {
        self.0.touch();
    }
}
