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
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::stream::{Resumed, SseStream, StreamHandle};
use crate::subject::SubjectPrefix;
use crate::subject::{self, Kind};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::link::{Link, LinkFailure, Liveness, Missed};
use super::replay::Replay;
use super::{first_sequence, BusError, BusErrorKind, Position, Published, Retained};

/// Where a resume starts.
#[derive(Clone, Debug)]
enum ResumeFrom {
    /// After the client's `Last-Event-ID`.
    Client(u64),
    /// In place, after the last event the stream wrote; a stream with no
    /// such point gets `gap` with this reason.
    InPlace(GapReason),
    /// After a remembered position, for a new stream held since before it
    /// was attached; with the control to open with when the resume has none.
    Remembered(u64, Option<Control>),
}

/// How long a resume is retried (JetStream electing a leader, say) before
/// its stream is told to reconnect.
const RESUME_PATIENCE: Duration = Duration::from_secs(30);

/// One NATS subscription shared by every stream that needs its subject.
struct SubEntry {
    refs: usize,
    ready: watch::Receiver<bool>,
    /// With replay: the last stream sequence it dispatched (where a stream
    /// that opens on it stands).
    last: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

struct DispatchState {
    next_seq: u64,
}

/// How streams hear that they may have missed events.
struct Telling {
    /// With replay, streams resume instead of getting `gap`.
    replay: bool,
    /// The base of the `retry:` hint streams told to reconnect get.
    retry: Duration,
}

/// The NATS bus.
pub struct NatsBus {
    client: Client,
    /// The client's counters (connections made: see `Link::notice_reconnects`).
    stats: Arc<async_nats::Statistics>,
    prefix: String,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    /// `herald_events_received_total{source="nats"}`, resolved once.
    received: prometheus::IntCounter,
    link: Arc<Link>,
    telling: Telling,
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
        let link = Arc::new(Link::new(metrics.clone()));
        let mut opts = ConnectOptions::new()
            .name(format!("{}-{instance}", cfg.name))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .subscription_capacity(cfg.subscription_capacity)
            .connection_timeout(cfg.request_timeout)
            .ping_interval(cfg.ping_interval)
            .custom_inbox_prefix(&cfg.inbox_prefix)
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
        opts = opts.event_callback(move |ev| {
            let link = cb_link.clone();
            async move { on_client_event(ev, &link) }
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
                super::replay::ReplayMetrics {
                    duplicate_acks: metrics.replay_duplicate_acks.clone(),
                    waiting: metrics.replays_waiting.clone(),
                    read_by: metrics.replay_reads.clone(),
                },
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
        let liveness = Liveness::new(
            cfg.prefix.as_str(),
            instance,
            cfg.liveness_interval,
            cfg.liveness_timeout,
        );
        let bus = Arc::new(NatsBus {
            replay,
            stats: client.statistics(),
            client,
            prefix: cfg.prefix.to_string(),
            router,
            received: metrics.events_received.with_label_values(&["nats"]),
            metrics,
            link,
            telling: Telling {
                replay: replay_cfg.enabled,
                retry,
            },
            subs: Mutex::new(HashMap::new()),
            dispatch: Mutex::new(DispatchState {
                next_seq: first_sequence(),
            }),
            max_event_bytes,
            request_timeout: cfg.request_timeout,
            tasks,
            stop,
        });
        if bus.replay.is_some() {
            // From the moment the link stops delivering, streams hold what
            // arrives until their resume (read once it delivers again) is
            // written: nothing newer overtakes what they missed.
            let me = Arc::downgrade(&bus);
            bus.link.on_down(move || {
                if let Some(bus) = me.upgrade() {
                    for c in bus.router.connections() {
                        c.pause();
                    }
                }
            });
        }
        let me = bus.clone();
        bus.tasks.spawn(liveness.run(
            bus.client.clone(),
            bus.link.clone(),
            bus.stop.clone(),
            move |missed| me.tell_missed(missed),
        ));
        Ok(bus)
    }

    /// Tells every stream it may have missed events. With replay, after an
    /// outage each resumes in place from the replay stream (no reconnect);
    /// after the client dropped messages it reconnects and resumes from its
    /// last id. Without replay, `gap`.
    fn tell_missed(self: &Arc<Self>, missed: Missed) {
        let streams = self.router.connections();
        let (gap, what) = match missed {
            Missed::Outage => (GapReason::BusReconnected, "the NATS link delivers again"),
            Missed::Overflow => (GapReason::BusOverflow, "the NATS client dropped messages"),
        };
        if self.telling.replay {
            tracing::info!(
                streams = streams.len(),
                "{what}; open streams resume in place from the replay stream"
            );
            for c in streams {
                self.spawn_resume(c, ResumeFrom::InPlace(gap));
            }
        } else {
            tracing::info!(streams = streams.len(), "{what}; open streams get gap");
            for c in streams {
                c.notify_gap(gap);
            }
        }
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

    /// Whether the link delivers: the client is connected and herald's own
    /// last check passed.
    pub fn is_connected(&self) -> bool {
        self.link.is_healthy()
            && self.client.connection_state() == async_nats::connection::State::Connected
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
                let (seq, duplicate) = replay.publish(subj, &ev.id, Bytes::from(ev.json)).await?;
                out.push(Published {
                    id: ev.id,
                    sequence: Some(seq),
                    duplicate,
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
                duplicate: false,
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
        let mut lasts = Vec::new();
        {
            let mut subs = self.subs.lock();
            for s in &subjects {
                let entry = subs
                    .entry(s.clone())
                    .or_insert_with(|| self.start_subscription(s.clone()));
                entry.refs += 1;
                waits.push(entry.ready.clone());
                lasts.push(entry.last.clone());
            }
            self.metrics.nats_subscriptions.set(subs.len() as i64);
        }
        stream.hold(Box::new(InterestGuard {
            bus: self.clone(),
            subjects,
        }));
        // A remembered stream on a subscription that has seen nothing yet
        // starts at the replay stream's newest event, read before the stream
        // is registered (so it has every event after it).
        let mut head = 0;
        if let (None, Some(replay), true) = (resume_from, &self.replay, stream.starts_at_head()) {
            if lasts.iter().all(|l| l.load(Ordering::Acquire) == 0) && self.is_connected() {
                head = replay.last_sequence().await.unwrap_or(0);
            }
        }
        // Registered under the dispatch lock: every event after `stands_at`
        // reaches the stream, so an in-place resume may start there.
        let (reg, stands_at) = {
            let _dispatch = self.dispatch.lock();
            let at = lasts.iter().map(|l| l.load(Ordering::Acquire)).max();
            (self.router.add(conn.clone()), at.unwrap_or(0))
        };
        stream.hold(Box::new(reg));
        if self.replay.is_some() {
            stream.start_after(resume_from.unwrap_or(stands_at.max(head)));
        }
        if !self.is_connected() {
            if self.replay.is_some() && self.link.outage_pending() {
                // The recovery resumes every stream in place, this one too:
                // it holds live events until then.
                conn.pause();
                if self.is_connected() {
                    // The recovery may have looked at the streams already.
                    self.spawn_resume(conn, ResumeFrom::InPlace(GapReason::BusReconnected));
                }
                return Ok(());
            }
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
        if self.replay.is_none() {
            stream.open_with(&Control::Gap(GapReason::ReplayUnavailable), after);
            return Ok(());
        }
        // The stream opens now and holds live events while its resume is
        // read (replay reads are bounded; it may wait its turn).
        self.spawn_resume(conn, ResumeFrom::Client(after));
        Ok(())
    }

    /// Reads and hands a stream its resume, in a task: from `client_id` (a
    /// new stream's `Last-Event-ID`) or, in place, from the last event the
    /// stream wrote. The stream holds live events meanwhile; a later hold
    /// supersedes this one (its task gives up, its plan would be dropped).
    fn spawn_resume(self: &Arc<Self>, handle: Arc<StreamHandle>, from: ResumeFrom) {
        let generation = handle.pause();
        self.spawn_resume_of(handle, generation, from);
    }

    /// [`Bus::resume_held`](super::Bus::resume_held) on NATS: the read in a task.
    pub(super) fn resume_held(
        self: &Arc<Self>,
        handle: Arc<StreamHandle>,
        generation: u64,
        after: u64,
        open: Option<Control>,
    ) {
        if self.replay.is_none() {
            handle.resume_with(Resumed::nothing(generation, after, open));
            return;
        }
        self.spawn_resume_of(handle, generation, ResumeFrom::Remembered(after, open));
    }

    fn spawn_resume_of(
        self: &Arc<Self>,
        handle: Arc<StreamHandle>,
        generation: u64,
        from: ResumeFrom,
    ) {
        let bus = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = bus.stop.cancelled() => {}
                _ = bus.resume_stream(&handle, generation, from) => {}
            }
        });
    }

    async fn resume_stream(&self, handle: &Arc<StreamHandle>, generation: u64, from: ResumeFrom) {
        let Some(replay) = &self.replay else {
            return;
        };
        let (restart, open) = match &from {
            ResumeFrom::Remembered(_, open) => (true, open.clone()),
            _ => (false, None),
        };
        let after = match from {
            ResumeFrom::Client(id) | ResumeFrom::Remembered(id, _) => id,
            ResumeFrom::InPlace(gap) => match handle.position() {
                // The stream has no point to resume from (it opened on a
                // new subscription and wrote nothing): it may have missed some.
                0 => {
                    handle.resume_with(Resumed::control(generation, 0, Control::Gap(gap)));
                    return;
                }
                at => at,
            },
        };
        let wanted = || !handle.is_finished() && handle.pauses() == generation;
        // Time with the link down does not count: waiting serves the stream.
        let mut give_up = tokio::time::Instant::now() + RESUME_PATIENCE;
        let mut backoff = Duration::from_millis(100);
        loop {
            if !wanted() {
                return;
            }
            let e = match self.retained(replay, &handle.project, after, &wanted).await {
                Ok(Some(retained)) => {
                    let plan = super::plan_resume(
                        handle,
                        generation,
                        after,
                        retained,
                        &self.router,
                        &self.metrics,
                    );
                    handle.resume_with(plan.held(restart, open));
                    return;
                }
                Ok(None) => return,
                Err(e) => e,
            };
            if !self.is_connected() {
                give_up = tokio::time::Instant::now() + RESUME_PATIENCE;
            }
            if tokio::time::Instant::now() + backoff >= give_up {
                tracing::warn!(error = %e, stream = handle.id, "cannot read a resume; the stream is told to reconnect");
                handle.close(Close::Reconnect {
                    reason: ReconnectReason::BusUnavailable,
                    retry_ms: jittered_retry_ms(self.telling.retry),
                });
                return;
            }
            tracing::debug!(error = %e, stream = handle.id, "cannot read a resume yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// The retained events of `project` after `after`, read from the replay
    /// stream and checked like live messages.
    async fn retained(
        &self,
        replay: &Replay,
        project: &ProjectId,
        after: u64,
        wanted: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Retained>, BusError> {
        let Some(fetched) = replay.fetch(project, after, wanted).await? else {
            return Ok(None);
        };
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
        Ok(Some(Retained {
            position,
            events,
            truncated: fetched.truncated,
            through: fetched.through,
        }))
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
        let last = Arc::new(AtomicU64::new(0));
        let bus = self.clone();
        let dispatched = last.clone();
        let task = self.tasks.spawn(async move {
            let mut retry = Duration::from_millis(50);
            loop {
                match bus.client.subscribe(subj.clone()).await {
                    Ok(sub) => {
                        let _ = tx.send(true);
                        retry = Duration::from_millis(50);
                        if bus.deliver(sub, &dispatched).await.is_break() {
                            return;
                        }
                        // The message stream ended while streams still need
                        // it: count it, take the subscription again, and tell
                        // the project's streams what they may have missed.
                        tracing::warn!(subject = %subj, "a NATS subscription ended; subscribing again");
                        bus.link.failed(LinkFailure::SubscriptionEnded);
                        let _ = tx.send(false);
                    }
                    Err(e) => {
                        tracing::error!(subject = %subj, error = %e, "NATS subscribe failed; retrying");
                    }
                }
                tokio::select! {
                    _ = bus.stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(2));
            }
        });
        SubEntry {
            refs: 0,
            ready: rx,
            last,
            task,
        }
    }

    /// Feeds one subscription's messages to the router until it ends
    /// (`Continue`) or the bus stops (`Break`).
    async fn deliver(
        &self,
        mut sub: async_nats::Subscriber,
        dispatched: &AtomicU64,
    ) -> std::ops::ControlFlow<()> {
        let mut order = SequenceGuard::default();
        loop {
            let msg = tokio::select! {
                _ = self.stop.cancelled() => return std::ops::ControlFlow::Break(()),
                m = sub.next() => m,
            };
            let Some(msg) = msg else {
                return std::ops::ControlFlow::Continue(());
            };
            // The client reconnected, and its event saying so may come
            // later: the outage begins here, before anything that arrived
            // after it is dispatched.
            self.link.notice_reconnects(&self.stats);
            let seq = msg
                .headers
                .as_ref()
                // The server appends its own header after whatever the
                // producer sent: the last one is the stream's.
                .and_then(|h| h.get_last(async_nats::header::NATS_SEQUENCE))
                .map(|v| v.as_str());
            self.on_message(&msg.subject, &msg.payload, seq, &mut order, dispatched);
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

    /// Checks one message (see [`decode_message`]); anything else is
    /// counted by reason and dropped.
    fn check(&self, kind: Kind, subj: &str, payload: &[u8]) -> Option<Event> {
        match decode_message(&self.prefix, kind, subj, payload, self.max_event_bytes) {
            Ok(ev) => Some(ev),
            Err(reason) => {
                if reason == "subject_mismatch" {
                    tracing::debug!(
                        subject = subj,
                        "event envelope disagrees with its subject; dropped"
                    );
                }
                self.reject(reason);
                None
            }
        }
    }

    /// One live message: checked, numbered (or carrying its stream sequence,
    /// which must move forward on its subscription), dispatched.
    fn on_message(
        &self,
        subj: &str,
        payload: &[u8],
        sequence: Option<&str>,
        order: &mut SequenceGuard,
        dispatched: &AtomicU64,
    ) {
        let Some(ev) = self.check(self.live_kind(), subj, payload) else {
            return;
        };
        let stream_seq = if self.replay.is_some() {
            let Some(raw) = sequence else {
                return self.reject("missing_sequence");
            };
            let Some(seq) = raw.trim().parse::<u64>().ok().filter(|s| *s > 0) else {
                return self.reject("bad_sequence");
            };
            if let Err(reason) = order.admit(seq) {
                return self.reject(reason);
            }
            Some(seq)
        } else {
            None
        };
        // Numbering and dispatch under one lock: every stream sees increasing ids.
        let mut st = self.dispatch.lock();
        let seq = match stream_seq {
            Some(s) => s,
            None => {
                let s = st.next_seq;
                st.next_seq += 1;
                s
            }
        };
        self.received.inc();
        let d = Arc::new(Delivery::new(seq, ev));
        self.router.dispatch(&d);
        if stream_seq.is_some() {
            dispatched.store(seq, Ordering::Release);
        }
        drop(st);
    }
}

/// One message from NATS as an event: the subject must decode, the payload
/// be within `max_event_bytes` as sent (it is not even parsed otherwise),
/// the envelope validate and agree with the subject (project, environment,
/// type, path). The error is the reason it is counted under
/// (`herald_events_rejected_total{reason}`).
pub fn decode_message(
    prefix: &str,
    kind: Kind,
    subject: &str,
    payload: &[u8],
    max_event_bytes: usize,
) -> Result<Event, &'static str> {
    let key = subject::decode_subject(prefix, kind, subject).ok_or("bad_subject")?;
    if payload.len() > max_event_bytes {
        return Err("too_large");
    }
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|_| "malformed")?;
    let ev = Event::from_json(value, max_event_bytes).map_err(|e| e.kind.label())?;
    if ev.key != key {
        return Err("subject_mismatch");
    }
    Ok(ev)
}

/// The stream sequences one subscription has seen: each must be larger than
/// the last (JetStream republishes in order), so a repeat or an old message
/// is dropped. A mark that every message has been behind for
/// [`REANCHOR_AFTER`] is taken for a forgery (a producer with the right to
/// publish on `{prefix}.rp.>` sending a huge `Nats-Sequence`) and moved, so
/// that one message cannot silence a project for good.
#[derive(Default)]
pub struct SequenceGuard {
    last: u64,
    behind_since: Option<std::time::Instant>,
}

/// How long every message may be behind the mark before it moves.
const REANCHOR_AFTER: Duration = Duration::from_secs(5);

impl SequenceGuard {
    /// Admits `seq`, or says why not.
    pub fn admit(&mut self, seq: u64) -> Result<(), &'static str> {
        if seq > self.last {
            self.last = seq;
            self.behind_since = None;
            return Ok(());
        }
        let since = *self
            .behind_since
            .get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= REANCHOR_AFTER {
            tracing::warn!(
                mark = self.last,
                seq,
                "every message has been behind the sequence mark for 5s; moving the mark"
            );
            self.last = seq;
            self.behind_since = None;
            return Ok(());
        }
        Err("stale_sequence")
    }
}

fn on_client_event(ev: NatsEvent, link: &Link) {
    match ev {
        // Healthy once herald's own check passes (at once, asked here).
        NatsEvent::Connected => link.reconnected(),
        NatsEvent::Disconnected => link.failed(LinkFailure::Disconnected),
        NatsEvent::SlowConsumer(_) => link.overflowed(),
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
    /// The client's PING interval (a dead link is noticed by the client
    /// after about three of them; herald's own check is faster).
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How often herald checks that the link delivers (a round trip and a
    /// canary through its own subscription).
    #[serde(with = "humantime_serde")]
    pub liveness_interval: Duration,
    /// The longest such a check may take before the link counts as down.
    #[serde(with = "humantime_serde")]
    pub liveness_timeout: Duration,
    /// Prefix of the reply subjects herald's requests use (grant herald
    /// `subscribe` on `{inbox_prefix}.>`, and nobody else).
    pub inbox_prefix: String,
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
            ping_interval: Duration::from_secs(10),
            liveness_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(2),
            inbox_prefix: "_INBOX_herald".into(),
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
        for (key, d, min) in [
            (
                "nats.ping_interval",
                self.ping_interval,
                Duration::from_secs(1),
            ),
            (
                "nats.liveness_interval",
                self.liveness_interval,
                Duration::from_millis(50),
            ),
            (
                "nats.liveness_timeout",
                self.liveness_timeout,
                Duration::from_millis(50),
            ),
        ] {
            setting::duration(key, d, min, setting::MAX_DURATION)?;
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !self.inbox_prefix.split('.').all(token_ok) {
            return Err(invalid(
                "nats.inbox_prefix",
                "must be dot-separated tokens of A-Z a-z 0-9 _ -",
            ));
        }
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
