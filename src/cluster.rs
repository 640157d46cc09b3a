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
use crate::limits::{ConnectionLimiter, Elsewhere};
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::router::Router;

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
    /// Streams under Infisical's per-project rule: `[project, count]`
    /// (absent from older instances).
    #[serde(default)]
    pub infisical_streams: Vec<(String, usize)>,
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
    bounds: PresenceBounds,
    metrics: Arc<Metrics>,
}

/// What herald believes of an announcement: no honest instance has more
/// streams of one identity than the limits it enforces itself, so a claim
/// beyond them is a forgery (or a misconfigured peer) and is not believed at
/// all, rather than locking the identity out everywhere.
#[derive(Clone, Copy, Debug)]
pub struct PresenceBounds {
    /// `limits.connections_per_identity_project`.
    pub per_identity_project: usize,
    /// `limits.connections_per_identity`.
    pub per_identity: usize,
    /// `limits.infisical_streams_per_project`.
    pub per_project: usize,
}

/// Announcements larger than this are ignored (a bound on what a peer can make us parse).
const MAX_PRESENCE_BYTES: usize = 4 * 1024 * 1024;
/// Most peers remembered (a forger inventing instance ids cannot grow the map).
const MAX_PEERS: usize = 1024;
/// Longest instance id, version and fingerprint believed.
const MAX_FIELD_LEN: usize = 128;

/// Why an announcement was ignored (`herald_presence_rejected_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceRejection {
    /// Larger than [`MAX_PRESENCE_BYTES`].
    Oversized,
    /// Not an announcement.
    Malformed,
    /// A field out of shape (an id, a version, an identity, a project).
    BadField,
    /// More streams than any instance enforcing the limits can have.
    OverLimit,
    /// A new instance id while [`MAX_PEERS`] are remembered.
    TooManyPeers,
}

impl PresenceRejection {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            PresenceRejection::Oversized => "oversized",
            PresenceRejection::Malformed => "malformed",
            PresenceRejection::BadField => "bad_field",
            PresenceRejection::OverLimit => "over_limit",
            PresenceRejection::TooManyPeers => "too_many_peers",
        }
    }

    /// Every label.
    pub const LABELS: &'static [&'static str] = &[
        "oversized",
        "malformed",
        "bad_field",
        "over_limit",
        "too_many_peers",
    ];
}

impl Cluster {
    /// A view with no peers yet.
    pub fn new(
        instance_id: String,
        interval: Duration,
        bounds: PresenceBounds,
        metrics: Arc<Metrics>,
    ) -> Self {
        Metrics::preset(&metrics.presence_rejected, PresenceRejection::LABELS);
        Self {
            instance_id,
            peers: Mutex::new(HashMap::new()),
            interval,
            changed: Notify::new(),
            bounds,
            metrics,
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
        for (pr, n) in self
            .live_peers()
            .values()
            .flat_map(|p| p.presence.infisical_streams.iter())
        {
            if pr == project.as_str() {
                out.project_all = out.project_all.saturating_add(*n);
            }
        }
        out
    }

    /// Asks for an announcement soon (local streams changed).
    pub fn touch(&self) {
        self.changed.notify_one();
    }

    /// Records a peer's announcement, if it is believable.
    pub fn observe(&self, payload: &[u8]) {
        if let Err(why) = self.believe(payload) {
            tracing::debug!(reason = why.label(), "ignored a presence announcement");
            self.metrics
                .presence_rejected
                .with_label_values(&[why.label()])
                .inc();
        }
    }

    fn believe(&self, payload: &[u8]) -> Result<(), PresenceRejection> {
        if payload.len() > MAX_PRESENCE_BYTES {
            return Err(PresenceRejection::Oversized);
        }
        let p = serde_json::from_slice::<Presence>(payload)
            .map_err(|_| PresenceRejection::Malformed)?;
        if p.id == self.instance_id {
            return Ok(());
        }
        self.check(&p)?;
        let mut peers = self.live_peers();
        if !peers.contains_key(&p.id) && peers.len() >= MAX_PEERS {
            return Err(PresenceRejection::TooManyPeers);
        }
        peers.insert(
            p.id.clone(),
            Peer {
                presence: p,
                seen: Instant::now(),
                seen_at: SystemTime::now(),
            },
        );
        Ok(())
    }

    /// Whether an announcement is one an instance enforcing the same limits
    /// could make (time linear in its size).
    fn check(&self, p: &Presence) -> Result<(), PresenceRejection> {
        let short = |s: &str| !s.is_empty() && s.len() <= MAX_FIELD_LEN;
        let id_ok = short(&p.id)
            && p.id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok || !short(&p.version) || p.policy_fingerprint.len() > MAX_FIELD_LEN {
            return Err(PresenceRejection::BadField);
        }
        let mut per_identity: HashMap<&str, usize> = HashMap::new();
        let mut total = 0usize;
        for (identity, project, n) in &p.streams {
            if Principal::parse(identity).is_err() || ProjectId::parse(project).is_err() {
                return Err(PresenceRejection::BadField);
            }
            if *n > self.bounds.per_identity_project {
                return Err(PresenceRejection::OverLimit);
            }
            let sum = per_identity.entry(identity).or_default();
            *sum = sum.saturating_add(*n);
            if *sum > self.bounds.per_identity {
                return Err(PresenceRejection::OverLimit);
            }
            total = total.saturating_add(*n);
        }
        if total > p.connections {
            return Err(PresenceRejection::OverLimit);
        }
        let mut infisical = 0usize;
        for (project, n) in &p.infisical_streams {
            if ProjectId::parse(project).is_err() {
                return Err(PresenceRejection::BadField);
            }
            if *n > self.bounds.per_project {
                return Err(PresenceRejection::OverLimit);
            }
            infisical = infisical.saturating_add(*n);
        }
        if infisical > total {
            return Err(PresenceRejection::OverLimit);
        }
        Ok(())
    }

    /// The admin view: this instance and every live peer, and whether their
    /// policy fingerprints differ.
    pub fn view(&self, me: &Presence) -> ClusterView {
        let peers: Vec<(Presence, SystemTime)> = self
            .live_peers()
            .values()
            .map(|p| (p.presence.clone(), p.seen_at))
            .collect();
        let live: Vec<Presence> = peers.iter().map(|(p, _)| p.clone()).collect();
        let fingerprints = self.distinct_fingerprints(me, &live);
        let mut view = ClusterView::alone(me, "nats");
        view.instances.extend(
            peers
                .into_iter()
                .map(|(p, seen)| InstanceView::of(&p, false, Some(seen))),
        );
        view.distinct_policy_fingerprints = fingerprints;
        view.policy_drift = fingerprints > 1;
        view
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

/// One instance in `/admin/cluster`.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    /// Instance id.
    pub id: String,
    /// Whether it is this instance.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// herald version.
    pub version: String,
    /// Open streams.
    pub connections: usize,
    /// Policy generation in force.
    pub policy_generation: u64,
    /// Policy fingerprint in force.
    pub policy_fingerprint: String,
    /// When its last announcement arrived (RFC 3339); none for this instance.
    pub last_seen: Option<String>,
}

impl InstanceView {
    fn of(p: &Presence, is_self: bool, seen: Option<SystemTime>) -> Self {
        Self {
            id: p.id.clone(),
            is_self,
            version: p.version.clone(),
            connections: p.connections,
            policy_generation: p.policy_generation,
            policy_fingerprint: p.policy_fingerprint.clone(),
            last_seen: seen.map(crate::event::rfc3339),
        }
    }
}

/// `/admin/cluster`: the same shape on every bus.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// This instance's id.
    pub instance: String,
    /// `embedded` or `nats`.
    pub bus: &'static str,
    /// This instance first, then live peers.
    pub instances: Vec<InstanceView>,
    /// Distinct policy fingerprints among them.
    pub distinct_policy_fingerprints: usize,
    /// Whether they differ.
    pub policy_drift: bool,
}

impl ClusterView {
    /// The view of an instance that sees no peers.
    pub fn alone(me: &Presence, bus: &'static str) -> Self {
        Self {
            instance: me.id.clone(),
            bus,
            instances: vec![InstanceView::of(me, true, None)],
            distinct_policy_fingerprints: 1,
            policy_drift: false,
        }
    }
}

/// What this instance knows of itself, for its announcements and admin views.
pub struct LocalView {
    /// This process's instance id.
    pub instance_id: String,
    /// Open streams.
    pub router: Arc<Router>,
    /// The policy in force.
    pub authorizer: Arc<Authorizer>,
    /// Stream slots per identity and project.
    pub limiter: Arc<ConnectionLimiter>,
}

impl LocalView {
    /// What this instance announces to the others.
    pub fn presence(&self) -> Presence {
        let policy = self.authorizer.current();
        Presence {
            id: self.instance_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            connections: self.router.len(),
            policy_generation: policy.generation,
            policy_fingerprint: policy.fingerprint.clone(),
            streams: self
                .limiter
                .snapshot()
                .into_iter()
                .map(|(s, p, n)| (s.identity().to_owned(), p.to_string(), n))
                .collect(),
            infisical_streams: self
                .limiter
                .project_snapshot()
                .into_iter()
                .map(|(p, n)| (p.to_string(), n))
                .collect(),
        }
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
