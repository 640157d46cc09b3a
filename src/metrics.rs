//! Prometheus metrics: one [`Metrics`] value owns the registry and every series.
//!
//! Names follow Prometheus conventions (`_total` counters, base units) and the
//! list of DESIGN.md section 8. Labels are closed sets chosen in code, never
//! values from requests, so a client cannot blow up the series count.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric herald exports.
pub struct Metrics {
    registry: Registry,
    /// Open SSE streams.
    pub connections: IntGauge,
    /// Subscribe attempts by result.
    pub subscriptions: IntCounterVec,
    /// Publish requests by result.
    pub publishes: IntCounterVec,
    /// Events accepted into the router, by source (`api`, `nats`).
    pub events_received: IntCounterVec,
    /// Event frames handed to client connections.
    pub events_delivered: IntCounter,
    /// Events refused, by reason.
    pub events_rejected: IntCounterVec,
    /// Deliveries dropped, by reason.
    pub events_dropped: IntCounterVec,
    /// Publish-to-write latency.
    pub delivery_latency: Histogram,
    /// NATS subscriptions held (0 with the embedded bus).
    pub nats_subscriptions: IntGauge,
    /// 1 while connected to NATS (0 with the embedded bus).
    pub nats_connected: IntGauge,
    /// Times herald found the NATS link not delivering, by reason.
    pub nats_link_failures: IntCounterVec,
    /// JetStream acknowledgements that said "duplicate" (a retried publish).
    pub replay_duplicate_acks: IntCounter,
    /// Streams waiting for a replay slot.
    pub replays_waiting: IntGauge,
    /// Replay reads, by how they read (`direct`, `consumer`, `message`).
    pub replay_reads: IntCounterVec,
    /// Presence announcements ignored, by reason.
    pub presence_rejected: IntCounterVec,
    /// Token refusals, by reason.
    pub auth_failures: IntCounterVec,
    /// Permission denials, by stage (`subscribe`, `delivery`, `publish`).
    pub permission_denied: IntCounterVec,
    /// Generation of the policy in force.
    pub policy_generation: IntGauge,
    /// Policy loads, by result.
    pub policy_reloads: IntCounterVec,
    /// Events sent from the replay buffer on resume.
    pub replayed_events: IntCounter,
    /// Requests refused by a limit, by limit.
    pub limit_rejections: IntCounterVec,
    /// Delivery-time decision cache lookups, by result (`hit`, `miss`).
    pub decision_cache: IntCounterVec,
    /// Streams closed, by reason.
    pub streams_closed: IntCounterVec,
    /// Live instances seen over NATS, this one included.
    pub cluster_instances: IntGauge,
    /// Distinct policy fingerprints among live instances (more than 1: drift).
    pub cluster_policy_fingerprints: IntGauge,
    /// Key set refreshes, by issuer and result (`ok`, `failed`, `rate_limited`).
    pub key_set_refreshes: IntCounterVec,
    /// Keys in each issuer's set.
    pub key_set_keys: IntGaugeVec,
    /// When each issuer's set last loaded (UNIX seconds).
    pub key_set_updated: IntGaugeVec,
    /// Introspection answers, by issuer and result.
    pub introspections: IntCounterVec,
    /// Reconnects without `Last-Event-ID` looked up in the remembered
    /// positions, by result (`resumed`, `resumed_after_gap`, `window_passed`,
    /// `new`, `unavailable`).
    pub position_recalls: IntCounterVec,
    /// Remembered positions saved, by result (`ok`, `error`, `full`).
    pub position_saves: IntCounterVec,
    /// Ingested messages received, by source.
    pub ingest_received: IntCounterVec,
    /// Ingested events published, by source (first stored).
    pub ingest_published: IntCounterVec,
    /// Ingested messages taken before (replayed, or stored by another instance).
    pub ingest_duplicates: IntCounterVec,
    /// Ingested messages not taken, by source and reason.
    pub ingest_dropped: IntCounterVec,
    /// When each source's last event was published (UNIX seconds).
    pub ingest_last_event: IntGaugeVec,
    /// 1 while a source is connected (the webhook receiver: listening).
    pub ingest_connected: IntGaugeVec,
}

fn labelled<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])
        .expect("static metric definition is valid");
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("static metric definition is valid");
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric definition is valid");
    r.register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

impl Metrics {
    /// Creates and registers every metric, plus the process collector.
    pub fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // Registering can only fail on a duplicate, impossible on a fresh registry.
            let _ = r.register(Box::new(pc));
        }
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "herald_delivery_latency_seconds",
                "Time from an event being accepted to its frame being written to a client.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
        )
        .expect("static metric definition is valid");
        r.register(Box::new(delivery_latency.clone()))
            .expect("metric names are unique");
        let m = Metrics {
            connections: gauge(&r, "herald_connections", "Open SSE streams."),
            subscriptions: counter_vec(
                &r,
                "herald_subscriptions_total",
                "Subscribe requests by result.",
                "result",
            ),
            publishes: counter_vec(
                &r,
                "herald_publishes_total",
                "Publish requests by result.",
                "result",
            ),
            events_received: counter_vec(
                &r,
                "herald_events_received_total",
                "Events accepted, by source.",
                "source",
            ),
            events_delivered: counter(
                &r,
                "herald_events_delivered_total",
                "Event frames written to client streams.",
            ),
            events_rejected: counter_vec(
                &r,
                "herald_events_rejected_total",
                "Events refused, by reason.",
                "reason",
            ),
            events_dropped: counter_vec(
                &r,
                "herald_events_dropped_total",
                "Deliveries dropped, by reason.",
                "reason",
            ),
            delivery_latency,
            nats_subscriptions: gauge(
                &r,
                "herald_nats_subscriptions",
                "NATS subscriptions held by this instance.",
            ),
            nats_connected: gauge(
                &r,
                "herald_nats_connected",
                "1 while the NATS link delivers, as herald's own check observes it.",
            ),
            nats_link_failures: counter_vec(
                &r,
                "herald_nats_link_failures_total",
                "Times the NATS link was found not delivering, by reason.",
                "reason",
            ),
            replay_duplicate_acks: counter(
                &r,
                "herald_replay_duplicate_acks_total",
                "JetStream acknowledgements of a publish that were duplicates.",
            ),
            replays_waiting: gauge(
                &r,
                "herald_replays_waiting",
                "Resuming streams waiting for a replay slot.",
            ),
            replay_reads: counter_vec(
                &r,
                "herald_replay_reads_total",
                "Replay reads, by method.",
                "method",
            ),
            presence_rejected: counter_vec(
                &r,
                "herald_presence_rejected_total",
                "Presence announcements ignored, by reason.",
                "reason",
            ),
            auth_failures: counter_vec(
                &r,
                "herald_auth_failures_total",
                "Refused bearer tokens, by reason.",
                "reason",
            ),
            permission_denied: counter_vec(
                &r,
                "herald_permission_denied_total",
                "Permission denials, by stage.",
                "stage",
            ),
            policy_generation: gauge(
                &r,
                "herald_policy_generation",
                "Generation of the policy in force.",
            ),
            policy_reloads: counter_vec(
                &r,
                "herald_policy_reloads_total",
                "Policy loads, by result.",
                "result",
            ),
            replayed_events: counter(
                &r,
                "herald_replayed_events_total",
                "Events sent from the replay buffer on resume.",
            ),
            limit_rejections: counter_vec(
                &r,
                "herald_limit_rejections_total",
                "Requests refused by a limit, by limit.",
                "limit",
            ),
            cluster_instances: gauge(
                &r,
                "herald_cluster_instances",
                "Live herald instances seen over NATS, this one included.",
            ),
            cluster_policy_fingerprints: gauge(
                &r,
                "herald_cluster_policy_fingerprints",
                "Distinct policy fingerprints among live instances; more than 1 means drift.",
            ),
            decision_cache: counter_vec(
                &r,
                "herald_decision_cache_lookups_total",
                "Delivery-time permission cache lookups, by result.",
                "result",
            ),
            streams_closed: counter_vec(
                &r,
                "herald_streams_closed_total",
                "SSE streams ended, by reason.",
                "reason",
            ),
            key_set_refreshes: labelled(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "herald_key_set_refreshes_total",
                        "Token key set refreshes, by issuer and result (ok, failed, rate_limited).",
                    ),
                    &["issuer", "result"],
                )
                .expect("static metric definition is valid"),
            ),
            key_set_keys: labelled(
                &r,
                IntGaugeVec::new(
                    Opts::new("herald_key_set_keys", "Usable keys in each issuer's key set."),
                    &["issuer"],
                )
                .expect("static metric definition is valid"),
            ),
            key_set_updated: labelled(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "herald_key_set_updated_timestamp_seconds",
                        "When each issuer's key set last loaded, in UNIX seconds.",
                    ),
                    &["issuer"],
                )
                .expect("static metric definition is valid"),
            ),
            introspections: labelled(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "herald_introspections_total",
                        "Token introspection answers, by issuer and result (active, inactive, cached, stale, unavailable).",
                    ),
                    &["issuer", "result"],
                )
                .expect("static metric definition is valid"),
            ),
            position_recalls: labelled(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "herald_position_recalls_total",
                        "Streams opened without Last-Event-ID that looked up where they left off, by result (resumed, resumed_after_gap, window_passed, new, unavailable).",
                    ),
                    &["result"],
                )
                .expect("static metric definition is valid"),
            ),
            position_saves: labelled(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "herald_position_saves_total",
                        "Remembered stream positions written, by result (ok, error, full).",
                    ),
                    &["result"],
                )
                .expect("static metric definition is valid"),
            ),
            ingest_received: labelled(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "herald_ingest_received_total",
                        "Messages received from each ingest source.",
                    ),
                    &["source"],
                )
                .expect("static metric definition is valid"),
            ),
            ingest_published: labelled(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "herald_ingest_published_total",
                        "Ingested events published (stored first) by source.",
                    ),
                    &["source"],
                )
                .expect("static metric definition is valid"),
            ),
            ingest_duplicates: labelled(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "herald_ingest_duplicates_total",
                        "Ingested messages taken before (a replayed delivery, or one another instance stored), by source.",
                    ),
                    &["source"],
                )
                .expect("static metric definition is valid"),
            ),
            ingest_dropped: labelled(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "herald_ingest_dropped_total",
                        "Ingested messages not taken, by source and reason.",
                    ),
                    &["source", "reason"],
                )
                .expect("static metric definition is valid"),
            ),
            ingest_last_event: labelled(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "herald_ingest_last_event_timestamp_seconds",
                        "When each ingest source last published an event, in UNIX seconds.",
                    ),
                    &["source"],
                )
                .expect("static metric definition is valid"),
            ),
            ingest_connected: labelled(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "herald_ingest_connected",
                        "1 while an ingest source is connected (Redis subscribed; the webhook receiver listening).",
                    ),
                    &["source"],
                )
                .expect("static metric definition is valid"),
            ),
            registry: r,
        };
        // Pre-create the label sets operators alert on, so they read 0, not absent.
        let zero = |v: &IntCounterVec, labels: &[&str]| {
            for l in labels {
                v.with_label_values(&[l]);
            }
        };
        zero(&m.permission_denied, &["subscribe", "delivery", "publish"]);
        zero(&m.events_dropped, &["slow_consumer"]);
        zero(
            &m.events_rejected,
            &[
                "malformed",
                "missing_attribute",
                "bad_attribute",
                "unknown_type",
                "too_large",
                "bad_subject",
                "subject_mismatch",
                "missing_sequence",
                "bad_sequence",
                "stale_sequence",
            ],
        );
        zero(
            &m.limit_rejections,
            &[
                "connections_per_identity_project",
                "connections_per_identity",
                "max_connections",
                "subscribe_rate",
                "streams_per_project",
                "max_body_bytes",
            ],
        );
        zero(
            &m.streams_closed,
            &[
                "slow_consumer",
                "permission_revoked",
                "token_expired",
                "token_revoked",
                "reconnect",
                "client_gone",
            ],
        );
        zero(&m.events_received, &["api", "nats"]);
        zero(&m.policy_reloads, &["success", "error"]);
        zero(&m.decision_cache, &["hit", "miss"]);
        zero(
            &m.position_recalls,
            &[
                "resumed",
                "resumed_after_gap",
                "window_passed",
                "new",
                "unavailable",
            ],
        );
        zero(&m.position_saves, &["ok", "error", "full"]);
        m.cluster_instances.set(1);
        m.cluster_policy_fingerprints.set(1);
        m
    }

    /// Pre-creates `labels` of `series`, so that they read 0, not absent,
    /// before anything happened (each use case lists its own outcomes).
    pub fn preset(series: &IntCounterVec, labels: &[&str]) {
        for l in labels {
            series.with_label_values(&[l]);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
