//! Ingest: events from a stock Infisical, which does not publish to NATS.
//!
//! Two sources, each optional: its project webhooks ([`webhook`], a
//! listener of their own) and its internal Redis pub/sub bus ([`redis`]).
//! Each turns what it receives into herald events and publishes them
//! through the bus like any other ([`Ingest::publish`]). Every event gets
//! an id derived from the source message, so that in NATS mode with replay
//! several instances may ingest the same message and JetStream stores it
//! once (`Nats-Msg-Id`); NATS without replay has no such dedupe, and ingest
//! there is refused at start.
//!
//! Counted per source: received, published, duplicates, dropped by reason,
//! the last event's time, whether it is connected; `/admin/ingest` shows
//! each source's state.

pub mod redis;
pub mod webhook;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bus::replay::ReplayConfig;
use crate::bus::{Bus, BusError, Published};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::protocol::GapReason;
use crate::router::Router;
use crate::setting::Invalid;

pub use self::redis::RedisConfig;
pub use webhook::WebhookConfig;

/// `[ingest]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Infisical's project webhooks.
    pub webhook: WebhookConfig,
    /// Infisical's Redis bus.
    pub redis: RedisConfig,
}

impl IngestConfig {
    /// Checks what serde cannot; `nats` and `replay` say how events are
    /// distributed (several instances need replay's dedupe).
    pub fn validate(&self, nats: bool, replay: &ReplayConfig) -> Result<(), Invalid> {
        self.webhook.validate()?;
        self.redis.validate()?;
        if !nats || !self.enabled() {
            return Ok(());
        }
        if !replay.enabled {
            return Err(crate::setting::invalid(
                "ingest",
                "ingest on NATS needs replay.enabled = true: each source message is then stored once in JetStream (Nats-Msg-Id) whichever instances ingest it; without replay several instances would each publish it",
            ));
        }
        // A delivery replayed to another instance anywhere within the skew
        // (either side of now) must still be within JetStream's dedupe.
        let window = if replay.duplicate_window.is_zero() {
            std::time::Duration::from_secs(120) // JetStream's default
        } else {
            replay.duplicate_window
        };
        if self.webhook.listen.is_some() && window < self.webhook.max_skew * 2 {
            return Err(crate::setting::invalid(
                "ingest.webhook.max_skew",
                format!(
                    "must be at most half of replay.duplicate_window ({}), so that a delivery replayed to another instance is stored once",
                    humantime::format_duration(window)
                ),
            ));
        }
        Ok(())
    }

    /// Whether any source is configured.
    pub fn enabled(&self) -> bool {
        self.webhook.listen.is_some() || self.redis.url.is_some()
    }
}

/// A source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceId {
    /// Project webhooks.
    Webhook,
    /// The Redis bus.
    Redis,
}

impl SourceId {
    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            SourceId::Webhook => "webhook",
            SourceId::Redis => "redis",
        }
    }

    fn index(self) -> usize {
        match self {
            SourceId::Webhook => 0,
            SourceId::Redis => 1,
        }
    }

    const ALL: [SourceId; 2] = [SourceId::Webhook, SourceId::Redis];
}

/// What `/admin/ingest` shows of a source.
#[derive(Default)]
struct State {
    enabled: bool,
    connected: bool,
    last_event_ms: Option<u64>,
    last_error: Option<String>,
}

/// The ingest sources' shared half: publishing and counting.
pub struct Ingest {
    bus: Arc<Bus>,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    states: [Mutex<State>; 2],
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `ms` since the epoch as RFC 3339 with milliseconds (an event's `time`).
pub fn rfc3339_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

impl Ingest {
    /// Publishing through `bus`; `cfg` says which sources are on.
    pub fn new(
        cfg: &IngestConfig,
        bus: Arc<Bus>,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
    ) -> Self {
        for s in SourceId::ALL {
            let l = [s.label()];
            metrics.ingest_received.with_label_values(&l);
            metrics.ingest_published.with_label_values(&l);
            metrics.ingest_duplicates.with_label_values(&l);
            metrics.ingest_connected.with_label_values(&l);
        }
        for r in webhook::Refusal::LABELS {
            metrics.ingest_dropped.with_label_values(&["webhook", r]);
        }
        for r in redis::Drop::LABELS {
            metrics.ingest_dropped.with_label_values(&["redis", r]);
        }
        let ingest = Self {
            bus,
            router,
            metrics,
            states: Default::default(),
        };
        ingest.states[0].lock().enabled = cfg.webhook.listen.is_some();
        ingest.states[1].lock().enabled = cfg.redis.url.is_some();
        ingest
    }

    /// A message arrived from `source`.
    pub fn received(&self, source: SourceId) {
        self.metrics
            .ingest_received
            .with_label_values(&[source.label()])
            .inc();
    }

    /// A message was not taken, for `reason`.
    pub fn dropped(&self, source: SourceId, reason: &str) {
        self.metrics
            .ingest_dropped
            .with_label_values(&[source.label(), reason])
            .inc();
    }

    /// A message had been taken already.
    pub fn duplicate(&self, source: SourceId) {
        self.metrics
            .ingest_duplicates
            .with_label_values(&[source.label()])
            .inc();
    }

    /// Whether `source` is connected now (and, if not, why).
    pub fn connected(&self, source: SourceId, connected: bool, error: Option<String>) {
        let mut s = self.states[source.index()].lock();
        s.connected = connected;
        if error.is_some() {
            s.last_error = error;
        }
        self.metrics
            .ingest_connected
            .with_label_values(&[source.label()])
            .set(i64::from(connected));
    }

    /// Publishes an ingested event. A duplicate (JetStream stored its id
    /// before: another instance ingested the same message) is counted as one.
    pub async fn publish(&self, source: SourceId, event: Event) -> Result<Published, BusError> {
        let mut published = self.bus.publish(vec![event]).await.inspect_err(|e| {
            let mut s = self.states[source.index()].lock();
            s.last_error = Some(e.to_string());
            drop(s);
            self.dropped(source, "bus_unavailable");
        })?;
        let Some(p) = published.pop() else {
            return Err(BusError::new(crate::bus::BusErrorKind::Publish));
        };
        let l = [source.label()];
        if p.duplicate {
            self.metrics.ingest_duplicates.with_label_values(&l).inc();
        } else {
            self.metrics.ingest_published.with_label_values(&l).inc();
        }
        let now = now_ms();
        self.states[source.index()].lock().last_event_ms = Some(now);
        self.metrics
            .ingest_last_event
            .with_label_values(&l)
            .set(i64::try_from(now / 1000).unwrap_or(i64::MAX));
        Ok(p)
    }

    /// Tells every open stream that events may have been missed (a source
    /// that keeps nothing while herald is not listening was down).
    pub fn tell_gap(&self) {
        for c in self.router.connections() {
            c.notify_gap(GapReason::SourceUnavailable);
        }
    }

    /// `/admin/ingest`.
    pub fn view(&self) -> Value {
        let sources: Vec<Value> = SourceId::ALL
            .iter()
            .map(|s| {
                let st = self.states[s.index()].lock();
                let l = [s.label()];
                let m = &self.metrics;
                json!({
                    "source": s.label(),
                    "enabled": st.enabled,
                    "connected": st.connected,
                    "received": m.ingest_received.with_label_values(&l).get(),
                    "published": m.ingest_published.with_label_values(&l).get(),
                    "duplicates": m.ingest_duplicates.with_label_values(&l).get(),
                    "last_event_at": st.last_event_ms.map(rfc3339_ms),
                    "last_error": st.last_error,
                })
            })
            .collect();
        json!({"sources": sources})
    }
}
