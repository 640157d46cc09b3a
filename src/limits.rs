//! Admission limits: open streams per identity per project, per identity
//! across projects (both cluster-wide on NATS) and per instance, and the
//! subscribe rate per identity.
//!
//! A slot is held by a [`ConnectionSlot`] that lives inside the stream and gives
//! the slot back when the stream is dropped, however it ends. Every refusal
//! names the limit, so the HTTP layer can answer 429 with it and count it.
//!
//! The per-instance cap is `limits.max_connections`, lowered at start to what
//! the process's open-file limit leaves after `limits.reserved_fds` (see
//! the `rlimit` module): streams can never take the descriptors the publish API,
//! the admin listener and NATS need.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::ident::{Principal, ProjectId};
use crate::setting::{self, invalid, Invalid};
use serde::{Deserialize, Serialize};

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.connections_per_identity_project`
    ConnectionsPerIdentity,
    /// `limits.connections_per_identity` (across projects)
    ConnectionsPerIdentityTotal,
    /// `limits.max_connections`
    InstanceConnections,
    /// `limits.subscribe_rate` / `limits.subscribe_burst`
    SubscribeRate,
    /// `limits.infisical_streams_per_project` (all identities together)
    StreamsPerProject,
}

impl Limit {
    /// Metric label and error code suffix.
    pub fn label(self) -> &'static str {
        match self {
            Limit::ConnectionsPerIdentity => "connections_per_identity_project",
            Limit::ConnectionsPerIdentityTotal => "connections_per_identity",
            Limit::InstanceConnections => "max_connections",
            Limit::SubscribeRate => "subscribe_rate",
            Limit::StreamsPerProject => "streams_per_project",
        }
    }
}

#[derive(Default)]
struct Counts {
    per_identity_project: HashMap<(Principal, ProjectId), usize>,
    per_project: HashMap<ProjectId, usize>,
    per_identity: HashMap<Principal, usize>,
    total: usize,
}

/// Takes one from a count, forgetting it at zero.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// How streams on one project are bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectCap {
    /// `connections_per_identity_project` streams per identity.
    PerIdentity,
    /// `infisical_streams_per_project` streams, all identities together
    /// (Infisical's rule), counting only streams taken under this rule.
    AllIdentities,
}

/// Counts open streams.
pub struct ConnectionLimiter {
    counts: Arc<Mutex<Counts>>,
    per_identity_project: usize,
    per_identity: usize,
    per_project: usize,
    total: usize,
}

/// One held stream slot; released on drop.
pub struct ConnectionSlot {
    counts: Arc<Mutex<Counts>>,
    key: (Principal, ProjectId),
    /// Counted in its project's all-identities count (Infisical's rule).
    in_project: bool,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total = c.total.saturating_sub(1);
        release(&mut c.per_identity_project, &self.key);
        release(&mut c.per_identity, &self.key.0);
        if self.in_project {
            release(&mut c.per_project, &self.key.1);
        }
    }
}

/// Streams an identity holds on other instances (from their announcements).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Elsewhere {
    /// On the project asked for.
    pub project: usize,
    /// On every project.
    pub total: usize,
    /// Under Infisical's rule (all identities), on the project asked for.
    pub project_all: usize,
}

impl ConnectionLimiter {
    /// A limiter from `[limits]`, with at most `instance_cap` streams on this
    /// instance (`limits.max_connections`, or less when the open-file limit
    /// cannot hold that many).
    pub fn new(cfg: &LimitsConfig, instance_cap: usize) -> Self {
        Self {
            counts: Arc::default(),
            per_identity_project: cfg.connections_per_identity_project,
            per_identity: cfg.connections_per_identity,
            per_project: cfg.infisical_streams_per_project,
            total: instance_cap,
        }
    }

    /// The most streams this instance takes.
    pub fn instance_cap(&self) -> usize {
        self.total
    }

    /// The limit's configured value, for messages.
    pub fn value(&self, limit: Limit) -> usize {
        match limit {
            Limit::ConnectionsPerIdentity => self.per_identity_project,
            Limit::ConnectionsPerIdentityTotal => self.per_identity,
            Limit::InstanceConnections => self.total,
            Limit::SubscribeRate => 0,
            Limit::StreamsPerProject => self.per_project,
        }
    }

    /// Takes a slot for `identity` on `project`, or names the limit that refuses it.
    /// `elsewhere` is what the identity holds on other instances (the
    /// per-identity limits are cluster-wide).
    pub fn acquire(
        &self,
        identity: &Principal,
        project: &ProjectId,
        elsewhere: Elsewhere,
    ) -> Result<ConnectionSlot, Limit> {
        self.acquire_as(identity, project, elsewhere, ProjectCap::PerIdentity)
    }

    /// [`acquire`](Self::acquire), the per-project limit as `cap` says.
    pub fn acquire_as(
        &self,
        identity: &Principal,
        project: &ProjectId,
        elsewhere: Elsewhere,
        cap: ProjectCap,
    ) -> Result<ConnectionSlot, Limit> {
        let mut c = self.counts.lock();
        if c.total >= self.total {
            return Err(Limit::InstanceConnections);
        }
        let key = (identity.clone(), project.clone());
        match cap {
            ProjectCap::PerIdentity => {
                let here = c.per_identity_project.get(&key).copied().unwrap_or(0);
                if here.saturating_add(elsewhere.project) >= self.per_identity_project {
                    return Err(Limit::ConnectionsPerIdentity);
                }
            }
            ProjectCap::AllIdentities => {
                let here = c.per_project.get(project).copied().unwrap_or(0);
                if here.saturating_add(elsewhere.project_all) >= self.per_project {
                    return Err(Limit::StreamsPerProject);
                }
            }
        }
        let here_total = c.per_identity.get(identity).copied().unwrap_or(0);
        if here_total.saturating_add(elsewhere.total) >= self.per_identity {
            return Err(Limit::ConnectionsPerIdentityTotal);
        }
        *c.per_identity_project.entry(key.clone()).or_insert(0) += 1;
        *c.per_identity.entry(identity.clone()).or_insert(0) += 1;
        let in_project = cap == ProjectCap::AllIdentities;
        if in_project {
            *c.per_project.entry(project.clone()).or_insert(0) += 1;
        }
        c.total += 1;
        Ok(ConnectionSlot {
            counts: self.counts.clone(),
            key,
            in_project,
        })
    }

    /// Open streams under Infisical's rule, per project, on this instance.
    pub fn project_snapshot(&self) -> Vec<(ProjectId, usize)> {
        self.counts
            .lock()
            .per_project
            .iter()
            .map(|(p, n)| (p.clone(), *n))
            .collect()
    }

    /// Open streams per (identity, project) on this instance.
    pub fn snapshot(&self) -> Vec<(Principal, ProjectId, usize)> {
        self.counts
            .lock()
            .per_identity_project
            .iter()
            .map(|((s, p), n)| (s.clone(), p.clone(), *n))
            .collect()
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per identity for subscribe requests.
pub struct RateLimiter {
    buckets: Mutex<HashMap<Principal, Bucket>>,
    rate: f64,
    burst: f64,
}

/// Above this many tracked identities, full buckets are forgotten.
const PRUNE_AT: usize = 10_000;

impl RateLimiter {
    /// `rate` tokens per second, at most `burst` saved.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            rate,
            burst,
        }
    }

    /// Takes one token for `identity`; `false` when it has none left.
    pub fn try_take(&self, identity: &Principal) -> bool {
        let now = Instant::now();
        let mut map = self.buckets.lock();
        if map.len() > PRUNE_AT {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = map.entry(identity.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest accepted event (canonical JSON), in bytes.
    pub max_event_bytes: usize,
    /// Most registrations in one subscribe request.
    pub max_registrations: usize,
    /// Most open streams of one identity on one project (cluster-wide on NATS).
    pub connections_per_identity_project: usize,
    /// Most open streams of one identity on all projects together
    /// (cluster-wide on NATS).
    pub connections_per_identity: usize,
    /// On the Infisical-dialect listener, instead of
    /// `connections_per_identity_project`: most open streams on one project,
    /// all identities together (cluster-wide on NATS), as Infisical counts
    /// (its operator opens one stream per resource, all as one identity).
    pub infisical_streams_per_project: usize,
    /// Most open streams on this instance (lowered at start to what the
    /// open-file limit leaves after `reserved_fds`).
    pub max_connections: usize,
    /// File descriptors streams never take: kept for the publish API, the
    /// admin listener, NATS and the policy files.
    pub reserved_fds: usize,
    /// Most bytes of `secretPath` patterns one subscribe may register, all
    /// registrations together (each distinct pattern counted once).
    pub max_registration_bytes: usize,
    /// Sustained subscribe requests per second per identity.
    pub subscribe_rate: f64,
    /// Subscribe requests one identity may make in a burst.
    pub subscribe_burst: f64,
    /// Most events in one publish request.
    pub max_publish_batch: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_event_bytes: 64 * 1024,
            max_registrations: 10,
            connections_per_identity_project: 5,
            connections_per_identity: 100,
            infisical_streams_per_project: 100,
            max_connections: 50_000,
            reserved_fds: 256,
            max_registration_bytes: 4096,
            subscribe_rate: 5.0,
            subscribe_burst: 20.0,
            max_publish_batch: 100,
        }
    }
}

impl LimitsConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        setting::at_least("limits.max_body_bytes", self.max_body_bytes, 1024)?;
        if self.max_event_bytes < 256 || self.max_event_bytes > 8 * 1024 * 1024 {
            return Err(invalid(
                "limits.max_event_bytes",
                "must be between 256 and 8388608",
            ));
        }
        if self.max_registrations == 0 || self.max_registrations > 100 {
            return Err(invalid(
                "limits.max_registrations",
                "must be between 1 and 100",
            ));
        }
        setting::at_least(
            "limits.connections_per_identity_project",
            self.connections_per_identity_project,
            1,
        )?;
        setting::at_least(
            "limits.connections_per_identity",
            self.connections_per_identity,
            1,
        )?;
        setting::at_least(
            "limits.infisical_streams_per_project",
            self.infisical_streams_per_project,
            1,
        )?;
        setting::at_least("limits.max_connections", self.max_connections, 1)?;
        setting::at_least("limits.reserved_fds", self.reserved_fds, 16)?;
        setting::at_least(
            "limits.max_registration_bytes",
            self.max_registration_bytes,
            crate::path::MAX_PATH_LEN,
        )?;
        if !(self.subscribe_rate > 0.0 && self.subscribe_rate.is_finite()) {
            return Err(invalid(
                "limits.subscribe_rate",
                "must be a positive number",
            ));
        }
        if !(self.subscribe_burst >= 1.0 && self.subscribe_burst.is_finite()) {
            return Err(invalid("limits.subscribe_burst", "must be at least 1"));
        }
        setting::at_least("limits.max_publish_batch", self.max_publish_batch, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_infisical_cap_counts_a_project_whatever_the_identity() {
        let cfg = LimitsConfig {
            infisical_streams_per_project: 3,
            connections_per_identity_project: 1,
            ..LimitsConfig::default()
        };
        let l = ConnectionLimiter::new(&cfg, 100);
        let p = ProjectId::parse("p1").unwrap();
        let (a, b) = (
            Principal::parse("a").unwrap(),
            Principal::parse("b").unwrap(),
        );
        let none = Elsewhere::default();
        let s1 = l
            .acquire_as(&a, &p, none, ProjectCap::AllIdentities)
            .unwrap();
        let _s2 = l
            .acquire_as(&a, &p, none, ProjectCap::AllIdentities)
            .unwrap();
        assert_eq!(
            l.acquire(&a, &p, none).err(),
            Some(Limit::ConnectionsPerIdentity),
            "the native rule still counts them"
        );
        let _s3 = l
            .acquire_as(&b, &p, none, ProjectCap::AllIdentities)
            .unwrap();
        assert_eq!(
            l.acquire_as(&b, &p, none, ProjectCap::AllIdentities).err(),
            Some(Limit::StreamsPerProject)
        );
        // Other instances' streams of the project count.
        drop(s1);
        let busy = Elsewhere {
            project_all: 1,
            ..none
        };
        assert_eq!(
            l.acquire_as(&b, &p, busy, ProjectCap::AllIdentities).err(),
            Some(Limit::StreamsPerProject)
        );
        assert!(l
            .acquire_as(&b, &p, none, ProjectCap::AllIdentities)
            .is_ok());
    }

    #[test]
    fn slots_are_counted_and_released() {
        let cfg = LimitsConfig {
            connections_per_identity_project: 2,
            max_connections: 3,
            ..LimitsConfig::default()
        };
        let l = ConnectionLimiter::new(&cfg, cfg.max_connections);
        let (a, b) = (
            Principal::parse("a").unwrap(),
            Principal::parse("b").unwrap(),
        );
        let p = ProjectId::parse("p").unwrap();
        let none = Elsewhere::default();
        let s1 = l.acquire(&a, &p, none).unwrap();
        let _s2 = l.acquire(&a, &p, none).unwrap();
        assert_eq!(
            l.acquire(&a, &p, none).err(),
            Some(Limit::ConnectionsPerIdentity)
        );
        let _s3 = l.acquire(&b, &p, none).unwrap();
        assert_eq!(
            l.acquire(&b, &p, none).err(),
            Some(Limit::InstanceConnections)
        );
        drop(s1);
        let one_there = Elsewhere {
            project: 1,
            total: 1,
            project_all: 1,
        };
        assert_eq!(
            l.acquire(&a, &p, one_there).err(),
            Some(Limit::ConnectionsPerIdentity),
            "counts elsewhere count"
        );
        assert!(l.acquire(&a, &p, none).is_ok());
    }

    #[test]
    fn one_identity_cannot_take_every_slot_across_projects() {
        let cfg = LimitsConfig {
            connections_per_identity_project: 5,
            connections_per_identity: 8,
            max_connections: 40,
            ..LimitsConfig::default()
        };
        let l = ConnectionLimiter::new(&cfg, cfg.max_connections);
        let a = Principal::parse("a").unwrap();
        let mut held = Vec::new();
        let mut refused = None;
        'projects: for p in 0..9 {
            let project = ProjectId::parse(&format!("made-up-{p}")).unwrap();
            for _ in 0..5 {
                match l.acquire(&a, &project, Elsewhere::default()) {
                    Ok(s) => held.push(s),
                    Err(e) => {
                        refused = Some(e);
                        break 'projects;
                    }
                }
            }
        }
        assert_eq!(held.len(), 8);
        assert_eq!(refused, Some(Limit::ConnectionsPerIdentityTotal));
        // Others still get in, and the bound counts other instances too.
        let b = Principal::parse("b").unwrap();
        let p = ProjectId::parse("p").unwrap();
        assert!(l.acquire(&b, &p, Elsewhere::default()).is_ok());
        let full_elsewhere = Elsewhere {
            project: 0,
            total: 8,
            project_all: 0,
        };
        assert_eq!(
            l.acquire(&b, &p, full_elsewhere).err(),
            Some(Limit::ConnectionsPerIdentityTotal)
        );
        drop(held);
        assert!(l.acquire(&a, &p, Elsewhere::default()).is_ok());
    }

    #[test]
    fn bucket_allows_burst_then_refuses() {
        let r = RateLimiter::new(0.001, 3.0);
        let a = Principal::parse("a").unwrap();
        assert!(r.try_take(&a) && r.try_take(&a) && r.try_take(&a));
        assert!(!r.try_take(&a));
        assert!(r.try_take(&Principal::parse("b").unwrap()));
    }
}
