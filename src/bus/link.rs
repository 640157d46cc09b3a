//! Whether the NATS link delivers, as herald observes it.
//!
//! The client library's events say what it believes (`Connected`,
//! `Disconnected`), and can be lost (they travel on a bounded channel) or
//! wrong (a half-dead TCP link looks connected until pings time out). So
//! herald checks by itself, every `nats.liveness_interval`: a round trip to
//! the server (a request nobody answers, which the server refuses at once
//! with "no responders": that answer proves every earlier message on the
//! connection was processed) and a canary published on
//! `{prefix}.sys.canary.{instance}` that must come back through this
//! instance's own subscription. A check that fails or takes longer than
//! `nats.liveness_timeout` marks the link down (`/readyz` fails,
//! `herald_nats_connected` reads 0, `herald_nats_link_failures_total{reason}`
//! counts it) and rebuilds the connection.
//!
//! A link that was down and delivers again is an outage streams must hear
//! of: [`Link::recovered`] is true exactly once per outage, for whichever
//! observer (an event, the check) sees the link healthy first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::connection::State;
use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Why herald believes the link stopped delivering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkFailure {
    /// The client lost its connection.
    Disconnected,
    /// A round trip to the server failed or timed out.
    RoundTrip,
    /// The canary did not come back through this instance's subscription.
    Canary,
    /// A subscription's message stream ended.
    SubscriptionEnded,
    /// The client dropped messages (its buffer for a subscription was full).
    SlowConsumer,
}

impl LinkFailure {
    /// Metric label (`herald_nats_link_failures_total{reason}`).
    pub fn label(self) -> &'static str {
        match self {
            LinkFailure::Disconnected => "disconnected",
            LinkFailure::RoundTrip => "round_trip",
            LinkFailure::Canary => "canary",
            LinkFailure::SubscriptionEnded => "subscription_ended",
            LinkFailure::SlowConsumer => "slow_consumer",
        }
    }

    /// Every label.
    pub const LABELS: &'static [&'static str] = &[
        "disconnected",
        "round_trip",
        "canary",
        "subscription_ended",
        "slow_consumer",
    ];
}

/// The link's state, shared by the client's event callback, the liveness
/// check and the bus.
pub struct Link {
    /// Healthy as last observed (connected, and the last check passed).
    healthy: AtomicBool,
    /// Ever connected (the first connection is not a recovery).
    ever_connected: AtomicBool,
    /// An outage began and streams have not been told of its end yet.
    outage: AtomicBool,
    /// The client dropped messages and streams have not been told yet.
    overflowed: AtomicBool,
    /// Asks the liveness check to run now (after a reconnect).
    check_now: Notify,
    /// Connections the client had made when last noticed (see
    /// [`Link::notice_reconnects`]).
    connects: std::sync::atomic::AtomicU64,
    /// Called when a link that had delivered stops (see [`Link::on_down`]).
    on_down: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    metrics: Arc<Metrics>,
}

impl Link {
    /// A link not connected yet.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Metrics::preset(&metrics.nats_link_failures, LinkFailure::LABELS);
        Self {
            healthy: AtomicBool::new(false),
            ever_connected: AtomicBool::new(false),
            outage: AtomicBool::new(false),
            overflowed: AtomicBool::new(false),
            check_now: Notify::new(),
            connects: std::sync::atomic::AtomicU64::new(0),
            on_down: std::sync::OnceLock::new(),
            metrics,
        }
    }

    /// Calls `f` each time a link that had delivered is found not to (at
    /// once, before anything else of the outage happens). Set once.
    pub fn on_down(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_down.set(Box::new(f));
    }

    /// Whether an outage began that streams have not been told the end of
    /// (a recovery will tell every open stream).
    pub fn outage_pending(&self) -> bool {
        self.outage.load(Ordering::Acquire)
    }

    /// Looks at how many connections the client has made: a new one since
    /// last time is an outage, noticed here even when the client's own
    /// event saying so comes later (it is sent on a channel that may be
    /// full, and handled in another task).
    pub fn notice_reconnects(&self, stats: &async_nats::Statistics) {
        let now = stats.connects.load(Ordering::Relaxed);
        // Read first: on the hot path this is two loads of unshared lines.
        if self.connects.load(Ordering::Acquire) == now {
            return;
        }
        let before = self.connects.swap(now, Ordering::AcqRel);
        if before != 0 && before != now {
            self.failed(LinkFailure::Disconnected);
        }
    }

    /// Whether the link delivers, as last observed.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The link stopped delivering, for `why`.
    pub fn failed(&self, why: LinkFailure) {
        self.metrics
            .nats_link_failures
            .with_label_values(&[why.label()])
            .inc();
        let was = self.healthy.swap(false, Ordering::AcqRel);
        self.metrics.nats_connected.set(0);
        let had_delivered = self.ever_connected.load(Ordering::Acquire);
        if had_delivered {
            self.outage.store(true, Ordering::Release);
        }
        if was {
            tracing::warn!(reason = why.label(), "the NATS link is not delivering");
            if let (true, Some(f)) = (had_delivered, self.on_down.get()) {
                f();
            }
        }
    }

    /// The link delivers. Returns true when this ends an outage that
    /// streams have not been told of (exactly once per outage).
    pub fn recovered(&self) -> bool {
        self.healthy.store(true, Ordering::Release);
        self.metrics.nats_connected.set(1);
        if !self.ever_connected.swap(true, Ordering::AcqRel) {
            tracing::info!("connected to NATS");
            return false;
        }
        self.outage.swap(false, Ordering::AcqRel)
    }

    /// The client says it is connected again: check now, and let the
    /// check's success end the outage.
    pub fn reconnected(&self) {
        self.check_now.notify_one();
    }

    /// The client dropped a message (it says so once per message: streams
    /// are told once, by the next check).
    pub fn overflowed(&self) {
        self.metrics
            .events_dropped
            .with_label_values(&["nats_slow_consumer"])
            .inc();
        if !self.overflowed.swap(true, Ordering::AcqRel) {
            self.metrics
                .nats_link_failures
                .with_label_values(&[LinkFailure::SlowConsumer.label()])
                .inc();
            // Hold what arrives from now on: what was dropped is newer than
            // what the client had queued before it, so a resume from what
            // streams wrote last covers it.
            if let Some(f) = self.on_down.get() {
                f();
            }
            self.check_now.notify_one();
        }
    }
}

/// What streams may have missed, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missed {
    /// The link was down and delivers again.
    Outage,
    /// The client dropped messages while the link stayed up.
    Overflow,
}

/// The liveness check's settings.
#[derive(Clone, Debug)]
pub struct Liveness {
    /// `{prefix}.sys.canary.{instance}`.
    pub canary: String,
    /// `{prefix}.sys.ping.{instance}`: nobody answers it.
    pub ping: String,
    /// Time between checks.
    pub interval: Duration,
    /// The longest a check may take.
    pub timeout: Duration,
}

impl Liveness {
    /// The subjects of `instance` under `prefix`.
    pub fn new(prefix: &str, instance: &str, interval: Duration, timeout: Duration) -> Self {
        Self {
            canary: format!("{prefix}.sys.canary.{instance}"),
            ping: format!("{prefix}.sys.ping.{instance}"),
            interval,
            timeout,
        }
    }

    /// Checks the link until `stop`; after each outage, and after messages
    /// were dropped, calls `on_missed` once (which tells the streams).
    pub async fn run(
        self,
        client: Client,
        link: Arc<Link>,
        stop: CancellationToken,
        on_missed: impl Fn(Missed) + Send,
    ) {
        let mut canary: Option<async_nats::Subscriber> = None;
        let mut nonce: u64 = 0;
        let stats = client.statistics();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
                _ = link.check_now.notified() => {}
            }
            // A reconnect nothing else told of is an outage too.
            link.notice_reconnects(&stats);
            if client.connection_state() != State::Connected {
                if link.is_healthy() {
                    link.failed(LinkFailure::Disconnected);
                }
                continue;
            }
            nonce = nonce.wrapping_add(1);
            let mut stage = LinkFailure::RoundTrip;
            let checked = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(
                    self.timeout,
                    self.check(&client, &mut canary, nonce, &mut stage),
                ) => r,
            };
            match checked {
                Ok(Ok(())) => {
                    if link.recovered() {
                        // The resumes after the outage cover any drop too.
                        link.overflowed.store(false, Ordering::Release);
                        on_missed(Missed::Outage);
                    } else if link.overflowed.swap(false, Ordering::AcqRel) {
                        on_missed(Missed::Overflow);
                    }
                }
                Ok(Err(why)) => self.rebuild(&client, &link, &mut canary, why).await,
                Err(_) => self.rebuild(&client, &link, &mut canary, stage).await,
            }
        }
    }

    async fn rebuild(
        &self,
        client: &Client,
        link: &Link,
        canary: &mut Option<async_nats::Subscriber>,
        why: LinkFailure,
    ) {
        link.failed(why);
        // The canary's subscription may be what broke: take a new one.
        *canary = None;
        if let Err(e) = client.force_reconnect().await {
            tracing::warn!(error = %e, "cannot ask the NATS client to reconnect");
        }
    }

    /// One check: the canary goes out, a round trip proves the server
    /// processed it, and the canary comes back.
    async fn check(
        &self,
        client: &Client,
        canary: &mut Option<async_nats::Subscriber>,
        nonce: u64,
        stage: &mut LinkFailure,
    ) -> Result<(), LinkFailure> {
        if canary.is_none() {
            let sub = client
                .subscribe(self.canary.clone())
                .await
                .map_err(|_| LinkFailure::Canary)?;
            *canary = Some(sub);
        }
        let payload = Bytes::from(nonce.to_string());
        client
            .publish(self.canary.clone(), payload.clone())
            .await
            .map_err(|_| LinkFailure::Canary)?;
        match client.request(self.ping.clone(), Bytes::new()).await {
            Ok(_) => {}
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {}
            Err(_) => return Err(LinkFailure::RoundTrip),
        }
        *stage = LinkFailure::Canary;
        let sub = canary.as_mut().ok_or(LinkFailure::Canary)?;
        loop {
            match sub.next().await {
                // An earlier check's canary, late: keep reading.
                Some(m) if m.payload != payload => continue,
                Some(_) => return Ok(()),
                None => return Err(LinkFailure::Canary),
            }
        }
    }
}
