//! One client's SSE stream: its bounded queue and the response body that drains it.
//!
//! A [`Conn`] is the router-facing half: the identity, the project, the
//! registrations, and the sending side of a bounded queue. [`SseStream`] is the
//! HTTP-facing half, an `http_body::Body` that writes the preamble (`retry:`,
//! replayed events), then queued frames, heartbeats, and finally one control
//! event when the stream is closed (`slow_consumer`, `permission_revoked`,
//! `token_expired`, `reconnect`).
//!
//! The queue is bounded in frames; overflow is decided here: the connection is
//! closed with `slow_consumer` and its backlog dropped, so memory stays bounded
//! and a client that resumes with `Last-Event-ID` loses nothing retained.
//! Pushing never blocks; it takes one uncontended lock and allocates only
//! when the queue grows past the largest backlog it has had, so an idle
//! stream's queue holds no memory at all.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame as BodyFrame};
use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use crate::delivery::Delivery;
use crate::event::EventKey;
use crate::ident::{Principal, ProjectId};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::sse::{self, Control};

/// An event on its way to one connection: the shared delivery (encoded bytes
/// and what the permission check needs) and the policy generation it was
/// allowed under.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The delivery, shared by every receiver.
    pub delivery: Arc<Delivery>,
    /// The policy generation that allowed it. If another generation is in force
    /// when the frame is written, it is checked again first.
    pub generation: u64,
}

/// Why a stream is being closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client did not keep up; its queue overflowed.
    SlowConsumer,
    /// The policy no longer allows one of its registrations.
    PermissionRevoked(String),
    /// Its token expired.
    TokenExpired,
    /// The instance is draining; come back after `retry_ms`.
    Reconnect {
        /// The `retry:` hint, jittered per connection.
        retry_ms: u64,
    },
}

impl CloseReason {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::PermissionRevoked(_) => "permission_revoked",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Reconnect { .. } => "reconnect",
        }
    }

    fn frame(&self) -> Bytes {
        use serde_json::json;
        match self {
            CloseReason::SlowConsumer => sse::control_frame(
                Control::Error,
                &json!({"code": "slow_consumer", "message": "the client did not keep up; reconnect with Last-Event-ID"}),
                None,
            ),
            CloseReason::PermissionRevoked(reg) => sse::control_frame(
                Control::Error,
                &json!({"code": "permission_revoked", "message": format!("the policy no longer allows {reg}"), "registration": reg}),
                None,
            ),
            CloseReason::TokenExpired => sse::control_frame(
                Control::Error,
                &json!({"code": "token_expired", "message": "the token has expired; reconnect with a fresh token"}),
                None,
            ),
            CloseReason::Reconnect { retry_ms } => sse::control_frame(
                Control::Reconnect,
                &json!({"reason": "draining", "message": "this instance is shutting down; reconnect with Last-Event-ID"}),
                Some(*retry_ms),
            ),
        }
    }

    /// Whether frames already queued are still written before the control event.
    fn flushes_queue(&self) -> bool {
        matches!(self, CloseReason::Reconnect { .. })
    }
}

/// What happened to a pushed frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// The queue was full: the connection is now closing as a slow consumer.
    Overflow,
    /// The connection is already closing or gone.
    Closed,
}

/// Drops a whole client connection (set per TCP connection by the listener).
///
/// A stream whose client stopped reading cannot write its closing event: hyper
/// is blocked on the socket and never asks the body for more. After
/// `stream.close_timeout` such a connection is dropped through this handle.
/// It aborts the connection's task, so it costs nothing while unused (nothing
/// is polled on the connection's hot path).
#[derive(Default)]
pub struct ConnectionAbort(Mutex<Option<tokio::task::AbortHandle>>);

impl ConnectionAbort {
    /// Ties the handle to the task serving the connection, unless it has
    /// already moved (the listener sets it after spawning, which can be after
    /// the connection moved on).
    pub fn set(&self, task: tokio::task::AbortHandle) {
        self.0.lock().get_or_insert(task);
    }

    /// Moves the connection to another task (a stream written by
    /// `http::direct` runs as a task of its own).
    pub fn move_to(&self, task: tokio::task::AbortHandle) {
        *self.0.lock() = Some(task);
    }

    /// Drops the connection.
    pub fn abort(&self) {
        if let Some(task) = self.0.lock().as_ref() {
            task.abort();
        }
    }
}

/// The router-facing half of a stream.
pub struct Conn {
    /// Instance-unique id.
    pub id: u64,
    /// Who the stream is for.
    pub identity: Principal,
    /// The project.
    pub project: ProjectId,
    /// The registrations.
    pub interests: Box<[Interest]>,
    /// When the stream was opened.
    pub opened_at: SystemTime,
    queue: Mutex<Queue>,
    capacity: usize,
    close: Mutex<Option<CloseReason>>,
    closing: AtomicBool,
    gap: Mutex<Option<Bytes>>,
    /// Set when `close` or `gap` changed, so the stream looks at them (and
    /// takes their locks) only then.
    signalled: AtomicBool,
    waker: AtomicWaker,
    finished: Arc<AtomicBool>,
    last_dispatched: AtomicU64,
    close_timeout: Duration,
    abort: Option<Arc<ConnectionAbort>>,
    metrics: Arc<Metrics>,
}

impl Conn {
    /// Whether any registration wants this event.
    #[inline]
    pub fn wants(&self, key: &EventKey) -> bool {
        self.interests.iter().any(|i| i.matches(key))
    }

    /// Marks event `seq` as dispatched to this connection; `false` if it already
    /// was (another of its registrations matched), so it is queued only once.
    #[inline]
    pub fn mark_dispatched(&self, seq: u64) -> bool {
        self.last_dispatched.swap(seq, Ordering::Relaxed) != seq
    }

    /// Queues a frame without blocking; a full queue closes the connection.
    pub fn push(&self, frame: Frame) -> Push {
        if self.is_closing() {
            return Push::Closed;
        }
        let mut q = self.queue.lock();
        if q.ended {
            return Push::Closed;
        }
        if q.frames.len() >= self.capacity {
            drop(q);
            self.metrics
                .events_dropped
                .with_label_values(&["slow_consumer"])
                .inc();
            self.close(CloseReason::SlowConsumer);
            return Push::Overflow;
        }
        q.frames.push_back(frame);
        drop(q);
        self.waker.wake();
        Push::Queued
    }

    /// Asks the stream to end with `reason`. The first reason wins; returns
    /// whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut c = self.close.lock();
        if c.is_some() {
            return false;
        }
        self.metrics
            .streams_closed
            .with_label_values(&[reason.label()])
            .inc();
        *c = Some(reason);
        drop(c);
        self.closing.store(true, Ordering::Release);
        self.signalled.store(true, Ordering::Release);
        self.waker.wake();
        self.abort_if_stuck();
        true
    }

    /// Drops the client connection if the stream has not ended within
    /// `close_timeout` of being asked to close.
    fn abort_if_stuck(&self) {
        let (Some(abort), Ok(rt)) = (self.abort.clone(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let timeout = self.close_timeout;
        let finished = self.finished.clone();
        rt.spawn(async move {
            tokio::time::sleep(timeout).await;
            if !finished.load(Ordering::Acquire) {
                abort.abort();
            }
        });
    }

    /// Tells the client that events may have been missed (an outage of the
    /// bus, a dropped NATS message): it gets a `gap` event, the stream goes on.
    /// Several notices before the client reads collapse into one.
    pub fn notify_gap(&self, reason: &'static str) {
        let frame = sse::control_frame(
            Control::Gap,
            &serde_json::json!({"reason": reason, "message": "events may have been missed; resync"}),
            None,
        );
        *self.gap.lock() = Some(frame);
        self.signalled.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        // An atomic, not the `close` lock: every push on the hot path asks.
        self.closing.load(Ordering::Acquire)
    }

    /// Frames waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.lock().frames.len()
    }
}

/// A stream's queue: frames in dispatch order, and whether the stream ended
/// (nothing more is accepted). Empty, it holds no memory.
struct Queue {
    frames: VecDeque<Frame>,
    ended: bool,
}

/// Settings for a new stream.
pub struct StreamSettings {
    /// Queue capacity, in frames.
    pub queue_frames: usize,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// The first `retry:` hint.
    pub retry: Duration,
    /// Time until the token expires.
    pub expires_in: Duration,
    /// How long a closing stream may take to end before its connection is dropped.
    pub close_timeout: Duration,
}

/// The furthest deadline a stream keeps: a token that expires later (a
/// `exp` of 2^64 - 1, say) expires for the stream then.
const MAX_HORIZON: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + after`, saturated at [`MAX_HORIZON`]: values from a token or the
/// config can never overflow the clock.
fn deadline_after(now: Instant, after: Duration) -> Instant {
    let after = after.min(MAX_HORIZON);
    now.checked_add(after).unwrap_or(now)
}

/// Deliveries buffered in a stream's local metrics before they are flushed.
const METRIC_FLUSH_EVERY: u32 = 64;

/// The HTTP-facing half of a stream: a response body.
pub struct SseStream {
    conn: Arc<Conn>,
    preamble: VecDeque<Bytes>,
    replay: VecDeque<Frame>,
    replay_tail: Option<Bytes>,
    last_seq: u64,
    /// One timer for both the next heartbeat and the token's expiry.
    timer: Pin<Box<Sleep>>,
    /// The task the timer will wake, once polled since its last reset.
    timer_armed_for: Option<std::task::Waker>,
    heartbeat_every: Duration,
    next_heartbeat: Instant,
    expires_at: Instant,
    done: bool,
    /// Frames are written as HTTP/1.1 chunks (see `write_chunks`).
    chunked: bool,
    metrics: Arc<Metrics>,
    authorizer: Arc<Authorizer>,
    /// Per-stream metric buffers: the shared atomics are touched once per
    /// `METRIC_FLUSH_EVERY` deliveries (and at each heartbeat), not per event.
    delivered: prometheus::local::LocalIntCounter,
    latency: prometheus::local::LocalHistogram,
    unflushed: u32,
    /// Dropped with the stream: router registration, limit slots.
    _guards: Vec<Box<dyn Send + Sync>>,
}

/// Who a new stream is for and what it asks.
pub struct Subscriber {
    /// Instance-unique connection id.
    pub id: u64,
    /// Who the stream is for.
    pub identity: Principal,
    /// The project.
    pub project: ProjectId,
    /// The registrations.
    pub interests: Vec<Interest>,
}

/// Creates both halves of a stream.
pub fn new_stream(
    who: Subscriber,
    settings: &StreamSettings,
    abort: Option<Arc<ConnectionAbort>>,
    authorizer: Arc<Authorizer>,
    metrics: Arc<Metrics>,
) -> (Arc<Conn>, SseStream) {
    let Subscriber {
        id,
        identity,
        project,
        interests,
    } = who;
    let conn = Arc::new(Conn {
        id,
        identity,
        project,
        interests: interests.into_boxed_slice(),
        opened_at: SystemTime::now(),
        queue: Mutex::new(Queue {
            frames: VecDeque::new(),
            ended: false,
        }),
        capacity: settings.queue_frames,
        close: Mutex::new(None),
        closing: AtomicBool::new(false),
        gap: Mutex::new(None),
        signalled: AtomicBool::new(false),
        waker: AtomicWaker::new(),
        finished: Arc::new(AtomicBool::new(false)),
        last_dispatched: AtomicU64::new(0),
        close_timeout: settings.close_timeout,
        abort,
        metrics: metrics.clone(),
    });
    let now = Instant::now();
    let next_heartbeat = deadline_after(now, settings.heartbeat);
    let expires_at = deadline_after(now, settings.expires_in);
    let mut preamble = VecDeque::new();
    preamble.push_back(sse::retry_frame(settings.retry.as_millis() as u64));
    metrics.connections.inc();
    let stream = SseStream {
        conn: conn.clone(),
        preamble,
        replay: VecDeque::new(),
        replay_tail: None,
        last_seq: 0,
        timer: Box::pin(tokio::time::sleep_until(next_heartbeat.min(expires_at))),
        timer_armed_for: None,
        heartbeat_every: settings.heartbeat,
        next_heartbeat,
        expires_at,
        done: false,
        chunked: false,
        delivered: metrics.events_delivered.local(),
        latency: metrics.delivery_latency.local(),
        unflushed: 0,
        metrics,
        authorizer,
        _guards: Vec::new(),
    };
    (conn, stream)
}

impl SseStream {
    /// Appends a control frame to write before anything else (`gap`).
    pub fn push_preamble(&mut self, frame: Bytes) {
        self.preamble.push_back(frame);
    }

    /// Appends a `gap` after the replayed events (a replay that stopped short).
    pub fn push_replay_gap(&mut self, frame: Bytes) {
        self.replay_tail = Some(frame);
    }

    /// Appends a replayed event, written after the preamble and before live ones.
    pub fn push_replay(&mut self, frame: Frame) {
        self.replay.push_back(frame);
    }

    /// Marks `seq` as already written: queued frames up to it are skipped, so
    /// the seam between replay and live delivery has no duplicate.
    pub fn set_last_seq(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// Keeps `guard` alive as long as the stream.
    pub fn hold(&mut self, guard: Box<dyn Send + Sync>) {
        self._guards.push(guard);
    }

    fn next_queued(&mut self) -> Option<Frame> {
        self.conn.queue.lock().frames.pop_front()
    }

    /// The next queued frame; with none, registers for the next push (under
    /// the queue's lock, so a push cannot slip in between).
    fn next_queued_or_register(&mut self, cx: &mut Context<'_>) -> Option<Frame> {
        let mut q = self.conn.queue.lock();
        let f = q.frames.pop_front();
        if f.is_none() {
            self.conn.waker.register(cx.waker());
        }
        f
    }

    /// Nothing to write: the waker is registered for pushes (see
    /// `next_queued_or_register`); a notice that was signalled before it was
    /// registered is looked at again right away.
    fn sleep(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Infallible>>> {
        if self.conn.signalled.load(Ordering::Acquire) {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// The router-facing half.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    fn finish(
        &mut self,
        reason: &CloseReason,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Infallible>>> {
        self.flush_metrics();
        self.done = true;
        self.conn.finished.store(true, Ordering::Release);
        self.conn.queue.lock().ended = true;
        Poll::Ready(Some(Ok(BodyFrame::data(self.wire(reason.frame())))))
    }

    /// Makes the stream write HTTP/1.1 chunks rather than bare frames (its
    /// writer then adds only the last chunk).
    pub fn write_chunks(&mut self) {
        self.chunked = true;
    }

    /// A frame in the form this stream writes.
    fn wire(&self, frame: Bytes) -> Bytes {
        if self.chunked {
            crate::sse::chunk(&frame).0
        } else {
            frame
        }
    }

    fn deliver(&mut self, frame: Frame) -> Option<Bytes> {
        let d = &frame.delivery;
        if d.seq <= self.last_seq {
            return None;
        }
        self.last_seq = d.seq;
        // The policy changed since this frame was allowed: ask again, so nothing
        // the policy in force denies is ever written.
        if frame.generation != self.authorizer.generation()
            && !self.authorizer.may_receive(&self.conn.identity, &d.key)
        {
            self.metrics
                .permission_denied
                .with_label_values(&["delivery"])
                .inc();
            return None;
        }
        self.delivered.inc();
        self.latency.observe(d.accepted_at.elapsed().as_secs_f64());
        self.unflushed += 1;
        if self.unflushed >= METRIC_FLUSH_EVERY {
            self.flush_metrics();
        }
        Some(if self.chunked {
            d.chunk.clone()
        } else {
            d.frame.clone()
        })
    }

    fn flush_metrics(&mut self) {
        self.delivered.flush();
        self.latency.flush();
        self.unflushed = 0;
    }
}

impl Body for SseStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(b) = this.preamble.pop_front() {
            return Poll::Ready(Some(Ok(BodyFrame::data(this.wire(b)))));
        }
        while let Some(f) = this.replay.pop_front() {
            if let Some(b) = this.deliver(f) {
                return Poll::Ready(Some(Ok(BodyFrame::data(b))));
            }
        }
        if let Some(b) = this.replay_tail.take() {
            return Poll::Ready(Some(Ok(BodyFrame::data(this.wire(b)))));
        }
        // Written out: an idle stream keeps no buffers.
        if this.preamble.capacity() > 0 || this.replay.capacity() > 0 {
            this.preamble = VecDeque::new();
            this.replay = VecDeque::new();
        }
        loop {
            // Close and gap notices: only looked at when signalled.
            if this.conn.signalled.swap(false, Ordering::AcqRel) {
                let closing = this.conn.close.lock().clone();
                if let Some(reason) = closing {
                    this.conn.signalled.store(true, Ordering::Release); // terminal
                    if reason.flushes_queue() {
                        while let Some(f) = this.next_queued() {
                            if let Some(b) = this.deliver(f) {
                                return Poll::Ready(Some(Ok(BodyFrame::data(b))));
                            }
                        }
                    }
                    return this.finish(&reason);
                }
                if let Some(gap) = this.conn.gap.lock().take() {
                    return Poll::Ready(Some(Ok(BodyFrame::data(this.wire(gap)))));
                }
            }
            match this.next_queued_or_register(cx) {
                Some(f) => {
                    if let Some(b) = this.deliver(f) {
                        return Poll::Ready(Some(Ok(BodyFrame::data(b))));
                    }
                }
                None => break,
            }
        }
        // The timer is polled only when it may have fired, or has never been
        // polled by this task: once polled it wakes the task by itself.
        let armed = this
            .timer_armed_for
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if armed && !this.timer.is_elapsed() {
            return this.sleep(cx);
        }
        this.timer_armed_for = None;
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if now < this.expires_at {
                let heartbeat = now >= this.next_heartbeat;
                if heartbeat {
                    this.next_heartbeat = deadline_after(now, this.heartbeat_every);
                }
                let next = this.next_heartbeat.min(this.expires_at);
                this.timer.as_mut().reset(next);
                if heartbeat {
                    this.flush_metrics();
                    let beat = if this.chunked {
                        sse::HEARTBEAT_CHUNK
                    } else {
                        sse::HEARTBEAT
                    };
                    return Poll::Ready(Some(Ok(BodyFrame::data(Bytes::from_static(beat)))));
                }
                continue;
            }
            this.conn.close(CloseReason::TokenExpired);
            // Another reason may have won the race; end with whichever did.
            let reason = this
                .conn
                .close
                .lock()
                .clone()
                .unwrap_or(CloseReason::TokenExpired);
            return this.finish(&reason);
        }
        this.timer_armed_for = Some(cx.waker().clone());
        this.sleep(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        self.flush_metrics();
        self.conn.finished.store(true, Ordering::Release);
        self.metrics.connections.dec();
        // Frames still queued are lost with the stream: count them.
        let backlog = {
            let mut q = self.conn.queue.lock();
            q.ended = true;
            std::mem::take(&mut q.frames).len() as u64
        };
        let closing = self.conn.close.lock().clone();
        let label = match closing {
            Some(r) => r.label(),
            None => {
                self.metrics
                    .streams_closed
                    .with_label_values(&["client_gone"])
                    .inc();
                "client_gone"
            }
        };
        if backlog > 0 {
            self.metrics
                .events_dropped
                .with_label_values(&[label])
                .inc_by(backlog);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::ident::ProjectId;
    use crate::path::PathPattern;
    use crate::policy::PolicySource;

    struct Fixture {
        auth: Arc<Authorizer>,
        metrics: Arc<Metrics>,
        conn: Arc<Conn>,
        stream: SseStream,
    }

    fn source(policy: &str) -> PolicySource {
        let mut s = PolicySource::shipped();
        s.policy = policy.into();
        s
    }

    /// A stream of `identity` on project p1 for every secret:created event.
    async fn fixture(policy: &str, identity: &str, queue_frames: usize) -> Fixture {
        let metrics = Arc::new(Metrics::new());
        let auth = Arc::new(
            Authorizer::new(&source(policy), 100, metrics.clone())
                .await
                .unwrap(),
        );
        let settings = StreamSettings {
            queue_frames,
            heartbeat: Duration::from_secs(3600),
            retry: Duration::from_secs(1),
            expires_in: Duration::from_secs(3600),
            close_timeout: Duration::from_secs(10),
        };
        let interest = Interest {
            event_type: EventType::parse("secret:created").unwrap(),
            env: None,
            path: PathPattern::everything(),
        };
        let who = Subscriber {
            id: 1,
            identity: Principal::parse(identity).unwrap(),
            project: ProjectId::parse("p1").unwrap(),
            interests: vec![interest],
        };
        let (conn, stream) = new_stream(who, &settings, None, auth.clone(), metrics.clone());
        Fixture {
            auth,
            metrics,
            conn,
            stream,
        }
    }

    fn frame(seq: u64, path: &str, generation: u64) -> Frame {
        Frame {
            delivery: crate::delivery::tests::delivery(seq, "p1", path),
            generation,
        }
    }

    /// The `id:` of a written event frame.
    fn id_of(b: &Bytes) -> Option<u64> {
        std::str::from_utf8(b)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("id: "))?
            .parse()
            .ok()
    }

    async fn next_data(s: &mut SseStream) -> Option<Bytes> {
        let f = std::future::poll_fn(|cx| Pin::new(&mut *s).poll_frame(cx)).await?;
        f.ok().and_then(|f| f.into_data().ok())
    }

    #[tokio::test]
    async fn frames_queued_before_a_policy_swap_are_checked_again() {
        let mut f = fixture("p, alice, *, *, subscribe, *, /**, allow\n", "alice", 8).await;
        // Both allowed under generation 1 and queued.
        assert_eq!(f.conn.push(frame(1, "/public", 1)), Push::Queued);
        assert_eq!(f.conn.push(frame(2, "/secret", 1)), Push::Queued);
        // The policy now denies /secret before the frames are written.
        f.auth
            .reload(&source("p, alice, *, *, subscribe, *, /**, allow\np, alice, *, *, subscribe, *, /secret/**, deny\n"))
            .await
            .unwrap();
        assert_eq!(
            next_data(&mut f.stream).await.unwrap(),
            Bytes::from("retry: 1000\n\n")
        );
        assert_eq!(id_of(&next_data(&mut f.stream).await.unwrap()), Some(1));
        assert_eq!(f.conn.push(frame(3, "/public/x", 2)), Push::Queued);
        assert_eq!(
            id_of(&next_data(&mut f.stream).await.unwrap()),
            Some(3),
            "event 2 was dropped"
        );
    }

    #[tokio::test]
    async fn overflow_closes_with_slow_consumer() {
        let mut f = fixture("p, a, *, *, subscribe, *, /**, allow\n", "a", 2).await;
        assert_eq!(f.conn.push(frame(1, "/", 1)), Push::Queued);
        assert_eq!(f.conn.push(frame(2, "/", 1)), Push::Queued);
        assert_eq!(f.conn.push(frame(3, "/", 1)), Push::Overflow);
        assert_eq!(f.conn.push(frame(4, "/", 1)), Push::Closed);
        let _retry = next_data(&mut f.stream).await;
        let last = next_data(&mut f.stream).await.unwrap();
        assert!(std::str::from_utf8(&last)
            .unwrap()
            .contains("\"code\":\"slow_consumer\""));
        assert!(next_data(&mut f.stream).await.is_none());
        drop(f.stream);
        assert_eq!(
            f.metrics
                .events_dropped
                .with_label_values(&["slow_consumer"])
                .get(),
            3
        );
    }

    #[tokio::test]
    async fn a_gap_notice_is_written_once_and_the_stream_goes_on() {
        let mut f = fixture("p, a, *, *, subscribe, *, /**, allow\n", "a", 8).await;
        let _retry = next_data(&mut f.stream).await;
        f.conn.notify_gap("bus_reconnected");
        f.conn.notify_gap("bus_reconnected");
        let gap = next_data(&mut f.stream).await.unwrap();
        assert!(std::str::from_utf8(&gap)
            .unwrap()
            .starts_with("event: gap\n"));
        assert_eq!(f.conn.push(frame(1, "/", 1)), Push::Queued);
        assert_eq!(id_of(&next_data(&mut f.stream).await.unwrap()), Some(1));
    }
}
