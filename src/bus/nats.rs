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
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, Event as NatsEvent};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::NatsConfig;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::router::{Delivery, Router};
use crate::sse::{self, Control};
use crate::stream::SseStream;
use crate::subject;

use super::{first_sequence, BusError, Published};

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
}

/// The NATS bus.
pub struct NatsBus {
    client: Client,
    prefix: String,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    link: Arc<Link>,
    subs: Mutex<HashMap<String, SubEntry>>,
    dispatch: Mutex<DispatchState>,
    max_event_bytes: usize,
    request_timeout: Duration,
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
        instance: &str,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        max_event_bytes: usize,
    ) -> Result<Arc<NatsBus>, BusError> {
        let link = Arc::new(Link {
            connected: AtomicBool::new(false),
            ever_connected: AtomicBool::new(false),
        });
        let mut opts = ConnectOptions::new()
            .name(format!("{}-{instance}", cfg.name))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .subscription_capacity(cfg.subscription_capacity)
            .connection_timeout(cfg.request_timeout)
            .require_tls(cfg.require_tls);
        if let Some(t) = &cfg.token {
            opts = opts.token(t.clone());
        }
        if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(seed) = &cfg.nkey_seed {
            opts = opts.nkey(seed.clone());
        }
        if let Some(f) = &cfg.credentials_file {
            opts = opts.credentials_file(f).await.map_err(|e| {
                BusError::Unavailable(format!("nats.credentials_file {}: {e}", f.display()))
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
            BusError::Unavailable(format!("cannot connect to NATS {:?}: {e}", cfg.urls))
        })?;
        Ok(Arc::new(NatsBus {
            client,
            prefix: cfg.prefix.clone(),
            router,
            metrics,
            link,
            subs: Mutex::new(HashMap::new()),
            dispatch: Mutex::new(DispatchState {
                next_seq: first_sequence(),
            }),
            max_event_bytes,
            request_timeout: cfg.request_timeout,
        }))
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

    /// The router this bus feeds.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The server's version, once connected.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// Publishes validated events on their subjects; returns once the server has them.
    pub(super) async fn publish(&self, events: Vec<Event>) -> Result<Vec<Published>, BusError> {
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let subj =
                subject::event_subject(&self.prefix, &ev.project, &ev.env, ev.event_type, &ev.path);
            self.client
                .publish(subj, Bytes::from(ev.json))
                .await
                .map_err(|e| BusError::Unavailable(e.to_string()))?;
            out.push(Published {
                id: ev.id,
                sequence: None,
            });
        }
        // publish() only queues locally: a 202 must mean the server has the events.
        match tokio::time::timeout(self.request_timeout, self.client.flush()).await {
            Ok(Ok(())) => Ok(out),
            Ok(Err(e)) => Err(BusError::Unavailable(e.to_string())),
            Err(_) => Err(BusError::Unavailable(
                "NATS did not confirm the publish in time".into(),
            )),
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
        let conn = stream.conn().clone();
        let subjects = vec![subject::project_subject(&self.prefix, &conn.project)];
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
        let reg = self.router.add(conn);
        stream.hold(Box::new(reg));
        if resume_from.is_some() {
            stream.push_preamble(sse::control_frame(
                Control::Gap,
                &json!({"reason": "replay_unavailable",
                        "message": "this deployment keeps no replay; events after your last id may have been missed: resync"}),
                None,
            ));
        }
        if !self.is_connected() {
            stream.push_preamble(sse::control_frame(
                Control::Gap,
                &json!({"reason": "bus_unavailable", "message": "the event bus is reconnecting; events may be missed: resync"}),
                None,
            ));
            return Ok(());
        }
        let wait_all = async {
            for mut w in waits {
                let _ = w.wait_for(|r| *r).await;
            }
            self.client.flush().await
        };
        match tokio::time::timeout(self.request_timeout, wait_all).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(e.to_string())),
            Err(_) => Err(BusError::Unavailable(
                "NATS did not confirm the subscription in time".into(),
            )),
        }
    }

    fn start_subscription(self: &Arc<Self>, subj: String) -> SubEntry {
        let (tx, rx) = watch::channel(false);
        let bus = self.clone();
        let task = tokio::spawn(async move {
            let mut sub = match bus.client.subscribe(subj.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(subject = %subj, error = %e, "NATS subscribe failed");
                    return;
                }
            };
            let _ = tx.send(true);
            while let Some(msg) = sub.next().await {
                bus.on_message(&msg.subject, &msg.payload);
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
    fn on_message(&self, subj: &str, payload: &[u8]) {
        let Some(parts) = subject::decode_event_subject(&self.prefix, subj) else {
            return self.reject("bad_subject");
        };
        let value: serde_json::Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(_) => return self.reject("malformed"),
        };
        let ev = match Event::from_json(value, self.max_event_bytes) {
            Ok(e) => e,
            Err(e) => return self.reject(e.reason),
        };
        if ev.project != parts.project
            || ev.env != parts.env
            || ev.event_type != parts.event_type
            || ev.path != parts.path
        {
            tracing::debug!(
                subject = subj,
                "event envelope disagrees with its subject; dropped"
            );
            return self.reject("subject_mismatch");
        }
        // Numbering and dispatch under one lock: every stream sees increasing ids.
        let mut st = self.dispatch.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        self.metrics
            .events_received
            .with_label_values(&["nats"])
            .inc();
        let d = Arc::new(Delivery {
            seq,
            frame: sse::event_frame(seq, ev.event_type.name(), &ev.json),
            project: ev.project,
            event_type: ev.event_type,
            env: ev.env,
            path: ev.path,
            accepted_at: Instant::now(),
        });
        self.router.dispatch(&d);
    }
}

fn on_client_event(ev: NatsEvent, link: &Link, router: &Router, metrics: &Metrics) {
    match ev {
        NatsEvent::Connected => {
            link.connected.store(true, Ordering::Release);
            metrics.nats_connected.set(1);
            if link.ever_connected.swap(true, Ordering::AcqRel) {
                tracing::info!("reconnected to NATS; open streams get gap for the outage");
                for c in router.connections() {
                    c.notify_gap("bus_reconnected");
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
            tracing::warn!(
                sid,
                "NATS slow consumer: messages were dropped; streams get gap"
            );
            for c in router.connections() {
                c.notify_gap("bus_overflow");
            }
        }
        other => tracing::info!(event = %other, "NATS client event"),
    }
}
