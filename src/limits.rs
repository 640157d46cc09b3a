//! Admission limits: open streams per identity per project and per instance,
//! and the subscribe rate per identity.
//!
//! A slot is held by a [`ConnectionSlot`] that lives inside the stream and gives
//! the slot back when the stream is dropped, however it ends. Every refusal
//! names the limit, so the HTTP layer can answer 429 with it and count it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::LimitsConfig;
use crate::ident::ProjectId;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.connections_per_identity_project`
    ConnectionsPerIdentity,
    /// `limits.max_connections`
    InstanceConnections,
    /// `limits.subscribe_rate` / `limits.subscribe_burst`
    SubscribeRate,
}

impl Limit {
    /// Metric label and error code suffix.
    pub fn label(self) -> &'static str {
        match self {
            Limit::ConnectionsPerIdentity => "connections_per_identity_project",
            Limit::InstanceConnections => "max_connections",
            Limit::SubscribeRate => "subscribe_rate",
        }
    }
}

#[derive(Default)]
struct Counts {
    per_identity: HashMap<(Arc<str>, ProjectId), usize>,
    total: usize,
}

/// Counts open streams.
pub struct ConnectionLimiter {
    counts: Arc<Mutex<Counts>>,
    per_identity: usize,
    total: usize,
}

/// One held stream slot; released on drop.
pub struct ConnectionSlot {
    counts: Arc<Mutex<Counts>>,
    key: (Arc<str>, ProjectId),
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_identity.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.per_identity.remove(&self.key);
            }
        }
    }
}

impl ConnectionLimiter {
    /// A limiter from `[limits]`.
    pub fn new(cfg: &LimitsConfig) -> Self {
        Self {
            counts: Arc::default(),
            per_identity: cfg.connections_per_identity_project,
            total: cfg.max_connections,
        }
    }

    /// Takes a slot for `subject` on `project`, or names the limit that refuses it.
    /// `elsewhere` is how many streams the identity has on the project on other
    /// instances (the per-identity limit is cluster-wide).
    pub fn acquire(
        &self,
        subject: &Arc<str>,
        project: &ProjectId,
        elsewhere: usize,
    ) -> Result<ConnectionSlot, Limit> {
        let mut c = self.counts.lock();
        if c.total >= self.total {
            return Err(Limit::InstanceConnections);
        }
        let key = (subject.clone(), project.clone());
        let n = c.per_identity.entry(key.clone()).or_insert(0);
        if *n + elsewhere >= self.per_identity {
            return Err(Limit::ConnectionsPerIdentity);
        }
        *n += 1;
        c.total += 1;
        Ok(ConnectionSlot {
            counts: self.counts.clone(),
            key,
        })
    }

    /// Open streams per (identity, project) on this instance.
    pub fn snapshot(&self) -> Vec<(Arc<str>, ProjectId, usize)> {
        self.counts
            .lock()
            .per_identity
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
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
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

    /// Takes one token for `subject`; `false` when it has none left.
    pub fn try_take(&self, subject: &Arc<str>) -> bool {
        let now = Instant::now();
        let mut map = self.buckets.lock();
        if map.len() > PRUNE_AT {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = map.entry(subject.clone()).or_insert(Bucket {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_released() {
        let cfg = LimitsConfig {
            connections_per_identity_project: 2,
            max_connections: 3,
            ..LimitsConfig::default()
        };
        let l = ConnectionLimiter::new(&cfg);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let p = ProjectId::parse("p").unwrap();
        let s1 = l.acquire(&a, &p, 0).unwrap();
        let _s2 = l.acquire(&a, &p, 0).unwrap();
        assert_eq!(
            l.acquire(&a, &p, 0).err(),
            Some(Limit::ConnectionsPerIdentity)
        );
        let _s3 = l.acquire(&b, &p, 0).unwrap();
        assert_eq!(l.acquire(&b, &p, 0).err(), Some(Limit::InstanceConnections));
        drop(s1);
        assert_eq!(
            l.acquire(&a, &p, 1).err(),
            Some(Limit::ConnectionsPerIdentity),
            "counts elsewhere count"
        );
        assert!(l.acquire(&a, &p, 0).is_ok());
    }

    #[test]
    fn bucket_allows_burst_then_refuses() {
        let r = RateLimiter::new(0.001, 3.0);
        let a: Arc<str> = Arc::from("a");
        assert!(r.try_take(&a) && r.try_take(&a) && r.try_take(&a));
        assert!(!r.try_take(&a));
        assert!(r.try_take(&Arc::from("b")));
    }
}
