//! The NATS bus: many instances, one stream of events.
//!
//! Publishing sends each event on its subject (`subject` module). Receiving
//! takes interest only in the projects this instance's streams registered for:
//! one subscription per project (`{prefix}.ev.{project}.>`), reference-counted
//! across streams and dropped with the last one, so an instance with no stream
//! on project P receives nothing of P. One subscription per project, not one
//! per registration, because the client library hands each subscription its
//! own channel: two subscriptions would lose the publish order between them
//! (a `deleted` could overtake its `created`) and overlapping ones would
//! deliver a message twice. The router then filters exactly.
//!
//! Every message is checked before it reaches the router: the subject must
//! decode, the envelope must validate and agree with the subject (project,
//! environment, type, path); anything else is dropped and counted. Messages are
//! numbered and dispatched one at a time, under one lock, so every stream sees
//! increasing ids.
//!
//! While NATS is unreachable streams stay open; when it comes back the client
//! restores the subscriptions and every stream gets `gap` for the outage. A
//! NATS slow-consumer event (the client dropped messages) is a `gap` too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event as NatsEvent};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::replay::ReplayConfig;
use crate::delivery::Delivery;
use crate::event::Event;
use crate::ident::ProjectId;
use crate::metrics::Metrics;
use crate::protocol::{jittered_retry_ms, Close, Control, GapReason, ReconnectReason};
use crate::router::Router;
use crate::setting::{self, invalid, Invalid, Secret};
use crate::stream::SseStream;
use crate::subject::SubjectPrefix;
use crate::subject::{self, Kind};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::replay::Replay;
use super::{first_sequence, BusError, BusErrorKind, Position, Published, Retained};

/// One NATS subscription shared by every stream that needs its subject.
struct SubEntry {
    refs: usize,
    ready: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

struct DispatchState {
    next_seq: u64,
}

/// Connection state shared with the client's event callback.
struct Link {
    connected: AtomicBool,
    ever_connected: AtomicBool,
    /// With replay, streams resume after an outage instead of getting `gap`.
    replay: bool,
    /// The base of the `retry:` hint streams told to reconnect get.
    retry: Duration,
}

/// The NATS bus.
pub struct NatsBus {
    client: Client,
    prefix: String,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    /// `herald_events_received_total{source="nats"}`, resolved once.
    received: prometheus::IntCounter,
    link: Arc<Link>,
    subs: Mutex<HashMap<String, SubEntry>>,
    dispatch: Mutex<DispatchState>,
    max_event_bytes: usize,
    request_timeout: Duration,
    replay: Option<Arc<Replay>>,
    /// Every task the bus spawns (subscriptions, the replay set-up), and
    /// what tells them to stop.
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// Releases a stream's subjects when dropped (held by the stream).
struct InterestGuard {
    bus: Arc<NatsBus>,
    subjects: Vec<String>,
}

impl Drop for InterestGuard {
    fn drop(&mut self) {
        self.bus.release(&self.subjects);
    }
}

impl NatsBus {
    /// Connects (in the background: herald starts while NATS is down, not ready).
    pub async fn connect(
        cfg: &NatsConfig,
        replay_cfg: &ReplayConfig,
        instance: &str,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        max_event_bytes: usize,
        retry: Duration,
    ) -> Result<Arc<NatsBus>, BusError> {
        let link = Arc::new(Link {
            connected: AtomicBool::new(false),
            ever_connected: AtomicBool::new(false),
            replay: replay_cfg.enabled,
            retry,
        });
        let mut opts = ConnectOptions::new()
            .name(format!("{}-{instance}", cfg.name))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .subscription_capacity(cfg.subscription_capacity)
            .connection_timeout(cfg.request_timeout)
            .require_tls(cfg.require_tls);
        if let Some(t) = &cfg.token {
            opts = opts.token(t.expose().to_owned());
        }
        if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
            opts = opts.user_and_password(u.clone(), p.expose().to_owned());
        }
        if let Some(seed) = &cfg.nkey_seed {
            opts = opts.nkey(seed.expose().to_owned());
        }
        if let Some(f) = &cfg.credentials_file {
            opts = opts.credentials_file(f).await.map_err(|e| {
                BusError::with_source(BusErrorKind::Connect, e)
                    .doing(format!("reading nats.credentials_file {}", f.display()))
            })?;
        }
        if let Some(ca) = &cfg.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(c), Some(k)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
            opts = opts.add_client_certificate(c.clone(), k.clone());
        }
        let cb_link = link.clone();
        let cb_router = router.clone();
        let cb_metrics = metrics.clone();
        opts = opts.event_callback(move |ev| {
            let (link, router, metrics) = (cb_link.clone(), cb_router.clone(), cb_metrics.clone());
            async move { on_client_event(ev, &link, &router, &metrics) }
        });
        let client = opts.connect(cfg.urls.clone()).await.map_err(|e| {
            BusError::with_source(BusErrorKind::Connect, e).doing(format!("{:?}", cfg.urls))
        })?;
        let replay = replay_cfg.enabled.then(|| {
            Arc::new(Replay::new(
                client.clone(),
                replay_cfg.clone(),
                cfg.prefix.as_str(),
                cfg.request_timeout,
            ))
        });
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        if let Some(r) = replay.clone() {
            let stop = stop.clone();
            // The stream can only be set up once connected; retry until it
            // is (every second: a setup is one small request).
            tasks.spawn(async move {
                loop {
                    match r.ensure_stream().await {
                        Ok(()) => {
                            tracing::info!("replay stream ready");
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "replay stream not ready; retrying"),
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            });
        }
        Ok(Arc::new(NatsBus {
            replay,
            client,
            prefix: cfg.prefix.to_string(),
            router,
            received: metrics.events_received.with_label_values(&["nats"]),
            metrics,
            link,
            subs: Mutex::new(HashMap::new()),
            dispatch: Mutex::new(DispatchState {
                next_seq: first_sequence(),
            }),
            max_event_bytes,
            request_timeout: cfg.request_timeout,
            tasks,
            stop,
        }))
    }

    /// Stops every task of the bus (subscriptions, set-up) and waits for
    /// them, up to `deadline`; then flushes what the client still holds.
    pub async fn close(&self, deadline: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tasks.len(),
                "NATS tasks still running at the deadline"
            );
        }
        let _ = tokio::time::timeout(deadline, self.client.flush()).await;
    }

    /// The NATS client (for instance-to-instance traffic).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the client is connected now.
    pub fn is_connected(&self) -> bool {
        self.link.connected.load(Ordering::Acquire)
    }

    /// Whether publishes and new streams can be served: connected, and with
    /// replay, the stream is set up.
    pub fn is_ready(&self) -> bool {
        self.is_connected() && self.replay.as_ref().is_none_or(|r| r.is_ready())
    }

    /// The server's version, once connected.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// Publishes validated events on their subjects; returns once the server has them.
    pub(super) async fn publish(&self, events: Vec<Event>) -> Result<Vec<Published>, BusError> {
        if !self.is_ready() {
            return Err(BusError::new(if self.is_connected() {
                BusErrorKind::ReplayNotReady
            } else {
                BusErrorKind::NotConnected
            }));
        }
        if let Some(replay) = &self.replay {
            let mut out = Vec::with_capacity(events.len());
            for ev in events {
                let subj = subject::event_subject(&self.prefix, &ev.key);
                let seq = replay.publish(subj, &ev.id, Bytes::from(ev.json)).await?;
                out.push(Published {
                    id: ev.id,
                    sequence: Some(seq),
                });
            }
            return Ok(out);
        }
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let subj = subject::event_subject(&self.prefix, &ev.key);
            self.client
                .publish(subj, Bytes::from(ev.json))
                .await
                .map_err(|e| BusError::with_source(BusErrorKind::Publish, e))?;
            out.push(Published {
                id: ev.id,
                sequence: None,
            });
        }
        // publish() only queues locally: a 202 must mean the server has the events.
        match tokio::time::timeout(self.request_timeout, self.client.flush()).await {
            Ok(Ok(())) => Ok(out),
            Ok(Err(e)) => Err(BusError::with_source(BusErrorKind::Publish, e)),
            Err(_) => Err(BusError::new(BusErrorKind::Timeout).doing("confirming a publish")),
        }
    }

    /// Registers the stream and takes interest in its registrations' subjects;
    /// returns once the server knows the interest (so nothing published after
    /// the client sees its stream open is missed).
    pub(super) async fn attach(
        self: &Arc<Self>,
        stream: &mut SseStream,
        resume_from: Option<u64>,
    ) -> Result<(), BusError> {
        let conn = stream.handle().clone();
        let subjects = vec![self.live_subject(&conn.project)];
        let mut waits = Vec::new();
        {
            let mut subs = self.subs.lock();
            for s in &subjects {
                let entry = subs
                    .entry(s.clone())
                    .or_insert_with(|| self.start_subscription(s.clone()));
                entry.refs += 1;
                waits.push(entry.ready.clone());
            }
            self.metrics.nats_subscriptions.set(subs.len() as i64);
        }
        stream.hold(Box::new(InterestGuard {
            bus: self.clone(),
            subjects,
        }));
        let reg = self.router.add(conn.clone());
        stream.hold(Box::new(reg));
        if !self.is_connected() {
            stream.open_with(
                &Control::Gap(GapReason::BusUnavailable),
                resume_from.unwrap_or(0),
            );
            return Ok(());
        }
        let wait_all = async {
            for mut w in waits {
                let _ = w.wait_for(|r| *r).await;
            }
            self.client.flush().await
        };
        match tokio::time::timeout(self.request_timeout, wait_all).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BusError::with_source(BusErrorKind::Subscribe, e)),
            Err(_) => {
                return Err(BusError::new(BusErrorKind::Timeout).doing("confirming a subscription"))
            }
        }
        // Live delivery is in place: whatever the replay snapshot does not
        // hold arrives live, and what both hold is written once (the seam).
        let Some(after) = resume_from else {
            return Ok(());
        };
        let Some(replay) = &self.replay else {
            stream.open_with(&Control::Gap(GapReason::ReplayUnavailable), after);
            return Ok(());
        };
        let retained = self.retained(replay, &conn.project, after).await?;
        super::resume(stream, after, retained, &self.router, &self.metrics);
        Ok(())
    }

    /// The retained events of `project` after `after`, read from the replay
    /// stream and checked like live messages.
    async fn retained(
        &self,
        replay: &Replay,
        project: &ProjectId,
        after: u64,
    ) -> Result<Retained, BusError> {
        let fetched = replay.fetch(project, after).await?;
        let position = if fetched.unknown {
            Position::Unknown
        } else if fetched.expired {
            Position::Expired
        } else {
            Position::Known
        };
        let events = fetched
            .events
            .into_iter()
            .filter_map(|stored| {
                let ev = self.check(Kind::Events, &stored.subject, &stored.payload)?;
                Some(Arc::new(Delivery::new(stored.seq, ev)))
            })
            .collect();
        Ok(Retained {
            position,
            events,
            truncated: fetched.truncated,
            through: fetched.through,
        })
    }

    /// Where live events of a project arrive: the event subjects themselves, or
    /// with replay their republished copies, which carry the stream sequence.
    fn live_subject(&self, project: &ProjectId) -> String {
        subject::project_subject(&self.prefix, self.live_kind(), project)
    }

    fn live_kind(&self) -> Kind {
        match self.replay {
            Some(_) => Kind::Republished,
            None => Kind::Events,
        }
    }

    fn start_subscription(self: &Arc<Self>, subj: String) -> SubEntry {
        let (tx, rx) = watch::channel(false);
        let bus = self.clone();
        let task = self.tasks.spawn(async move {
            let mut sub = match bus.client.subscribe(subj.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(subject = %subj, error = %e, "NATS subscribe failed");
                    return;
                }
            };
            let _ = tx.send(true);
            loop {
                let msg = tokio::select! {
                    _ = bus.stop.cancelled() => return,
                    m = sub.next() => m,
                };
                let Some(msg) = msg else { return };
                let seq = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
                    .and_then(|v| v.as_str().parse::<u64>().ok());
                bus.on_message(&msg.subject, &msg.payload, seq);
            }
        });
        SubEntry {
            refs: 0,
            ready: rx,
            task,
        }
    }

    fn release(&self, subjects: &[String]) {
        let mut subs = self.subs.lock();
        for s in subjects {
            if let Some(e) = subs.get_mut(s) {
                e.refs -= 1;
                if e.refs == 0 {
                    // Dropping the subscriber inside the task unsubscribes.
                    e.task.abort();
                    subs.remove(s);
                }
            }
        }
        self.metrics.nats_subscriptions.set(subs.len() as i64);
    }

    /// Subjects this instance is subscribed to (admin view, tests).
    pub fn subscribed_subjects(&self) -> Vec<String> {
        let mut v: Vec<String> = self.subs.lock().keys().cloned().collect();
        v.sort();
        v
    }

    fn reject(&self, reason: &str) {
        self.metrics
            .events_rejected
            .with_label_values(&[reason])
            .inc();
    }

    /// Checks one message and dispatches it.
    /// Checks one message: the subject decodes, the envelope validates and
    /// agrees with the subject. Anything else is counted and dropped.
    fn check(&self, kind: Kind, subj: &str, payload: &[u8]) -> Option<Event> {
        let Some(key) = subject::decode_subject(&self.prefix, kind, subj) else {
            self.reject("bad_subject");
            return None;
        };
        let value: serde_json::Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(_) => {
                self.reject("malformed");
                return None;
            }
        };
        let ev = match Event::from_json(value, self.max_event_bytes) {
            Ok(e) => e,
            Err(e) => {
                self.reject(e.kind.label());
                return None;
            }
        };
        if ev.key != key {
            tracing::debug!(
                subject = subj,
                "event envelope disagrees with its subject; dropped"
            );
            self.reject("subject_mismatch");
            return None;
        }
        Some(ev)
    }

    /// One live message: checked, numbered (or carrying its stream sequence),
    /// dispatched.
    fn on_message(&self, subj: &str, payload: &[u8], stream_seq: Option<u64>) {
        let Some(ev) = self.check(self.live_kind(), subj, payload) else {
            return;
        };
        // Numbering and dispatch under one lock: every stream sees increasing ids.
        let mut st = self.dispatch.lock();
        let seq = match (&self.replay, stream_seq) {
            (Some(_), Some(s)) => s,
            (Some(_), None) => return self.reject("missing_sequence"),
            (None, _) => {
                let s = st.next_seq;
                st.next_seq += 1;
                s
            }
        };
        self.received.inc();
        let d = Arc::new(Delivery::new(seq, ev));
        self.router.dispatch(&d);
        drop(st);
    }
}

fn on_client_event(ev: NatsEvent, link: &Link, router: &Router, metrics: &Metrics) {
    match ev {
        NatsEvent::Connected => {
            link.connected.store(true, Ordering::Release);
            metrics.nats_connected.set(1);
            if link.ever_connected.swap(true, Ordering::AcqRel) {
                if link.replay {
                    // The stream kept everything: clients resume with Last-Event-ID.
                    tracing::info!("reconnected to NATS; open streams reconnect and resume from the replay stream");
                    for c in router.connections() {
                        c.close(Close::Reconnect {
                            reason: ReconnectReason::BusReconnected,
                            retry_ms: jittered_retry_ms(link.retry),
                        });
                    }
                } else {
                    tracing::info!("reconnected to NATS; open streams get gap for the outage");
                    for c in router.connections() {
                        c.notify_gap(GapReason::BusReconnected);
                    }
                }
            } else {
                tracing::info!("connected to NATS");
            }
        }
        NatsEvent::Disconnected => {
            link.connected.store(false, Ordering::Release);
            metrics.nats_connected.set(0);
            tracing::warn!("disconnected from NATS");
        }
        NatsEvent::SlowConsumer(sid) => {
            // The client dropped messages of a subscription: every stream may
            // have missed one.
            metrics
                .events_dropped
                .with_label_values(&["nats_slow_consumer"])
                .inc();
            if link.replay {
                // The stream has them: every stream reconnects and resumes.
                tracing::warn!(sid, "NATS slow consumer: messages were dropped; streams resume from the replay stream");
                for c in router.connections() {
                    c.close(Close::Reconnect {
                        reason: ReconnectReason::BusOverflow,
                        retry_ms: jittered_retry_ms(link.retry),
                    });
                }
            } else {
                tracing::warn!(
                    sid,
                    "NATS slow consumer: messages were dropped; streams get gap"
                );
                for c in router.connections() {
                    c.notify_gap(GapReason::BusOverflow);
                }
            }
        }
        other => tracing::info!(event = %other, "NATS client event"),
    }
}
/// `[nats]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs, e.g. `["nats://n1:4222", "nats://n2:4222"]`. Empty: embedded bus.
    pub urls: Vec<String>,
    /// Connection name shown by the server (the instance id is appended).
    pub name: String,
    /// First token(s) of every subject herald uses.
    pub prefix: SubjectPrefix,
    /// Token authentication (secret).
    pub token: Option<Secret>,
    /// User for user/password authentication.
    pub user: Option<String>,
    /// Password (secret).
    pub password: Option<Secret>,
    /// NKey seed (secret).
    pub nkey_seed: Option<Secret>,
    /// `.creds` file (JWT + NKey).
    pub credentials_file: Option<PathBuf>,
    /// CA certificate(s) to trust, PEM.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate, PEM (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// Client key, PEM.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to the server without TLS.
    pub require_tls: bool,
    /// Messages buffered per NATS subscription before the client drops (a `gap`).
    pub subscription_capacity: usize,
    /// Time allowed for connecting and for a publish to reach the server.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often this instance announces itself to the others.
    #[serde(with = "humantime_serde")]
    pub presence_interval: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            name: "herald".into(),
            prefix: SubjectPrefix::default(),
            token: None,
            user: None,
            password: None,
            nkey_seed: None,
            credentials_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            require_tls: false,
            subscription_capacity: 65_536,
            request_timeout: Duration::from_secs(5),
            presence_interval: Duration::from_secs(2),
        }
    }
}

impl NatsConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        setting::at_least("nats.subscription_capacity", self.subscription_capacity, 64)?;
        setting::duration(
            "nats.request_timeout",
            self.request_timeout,
            Duration::from_millis(10),
            setting::MAX_DURATION,
        )?;
        setting::duration(
            "nats.presence_interval",
            self.presence_interval,
            Duration::from_millis(50),
            setting::MAX_DURATION,
        )?;
        for u in &self.urls {
            if !(u.starts_with("nats://")
                || u.starts_with("tls://")
                || u.starts_with("ws://")
                || u.starts_with("wss://"))
            {
                return Err(invalid(
                    "nats.urls",
                    format!("{u:?} is not a nats://, tls://, ws:// or wss:// URL"),
                ));
            }
        }
        Ok(())
    }
}
