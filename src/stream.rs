//! One client's event stream: its bounded queue and the state machine that
//! drains it, independent of how the bytes reach the socket.
//!
//! A [`StreamHandle`] is the router-facing half: the identity, the project,
//! the registrations, and the sending side of a bounded queue. [`SseStream`]
//! is the writer-facing half: it yields [`Item`]s in a fixed order (the
//! opening, the resume's control events and replayed events, then a gap or
//! close notice when one is signalled, queued events, heartbeats) until one
//! closing control event, in the stream's [`Dialect`]. The writers (hyper's
//! body, or `http::direct`) turn items into bytes on the wire.
//!
//! The queue is bounded in events; overflow is decided here: the stream is
//! closed with `slow_consumer` and its backlog dropped, so memory stays
//! bounded and a client that resumes with `Last-Event-ID` loses nothing
//! retained. Pushing never blocks; it takes one uncontended lock and
//! allocates only when the queue grows past the largest backlog it has had,
//! so an idle stream's queue holds no memory at all.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use rand::Rng;
use tokio::time::{Instant, Sleep};

use crate::delivery::Delivery;
use crate::event::EventKey;
use crate::ident::{Principal, ProjectId};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::protocol::{jittered_retry_ms, Close, Control, Dialect, GapReason, ReconnectReason};
use crate::setting::{self, Invalid};
use serde::{Deserialize, Serialize};

/// An event on its way to one stream: the shared delivery and the policy
/// generation it was allowed under.
#[derive(Clone, Debug)]
pub struct Queued {
    /// The delivery, shared by every receiver.
    pub delivery: Arc<Delivery>,
    /// The policy generation that allowed it. If another generation is in force
    /// when it is written, it is checked again first.
    pub generation: u64,
}

/// What happened to a pushed event.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// The queue was full: the stream is now closing as a slow consumer.
    Overflow,
    /// The stream is already closing or gone.
    Closed,
}

/// A resume ready to be written into a stream (see `bus::plan_resume`):
/// built where the retained events are read, applied by the stream itself,
/// so that it can be read while the stream is already open.
#[derive(Debug)]
pub struct Resumed {
    /// The hold it ends ([`StreamHandle::pause`]): a plan read for an
    /// earlier hold is superseded and dropped.
    pub generation: u64,
    /// The id the resume starts after (what its opening `gap` names).
    pub from: u64,
    /// A control event written first (`gap`: unknown id, expired, ...).
    pub open: Option<Control>,
    /// Live events up to this id are the resume's (skipped when queued);
    /// `None` leaves live delivery as it is (an unknown id, a bare `gap`).
    pub seam: Option<u64>,
    /// The retained events the stream may see, in order.
    pub events: Vec<Queued>,
    /// A control event written after them (the replay stopped short).
    pub tail: Option<Control>,
    /// The stream wrote nothing before it (a new stream held from its
    /// start): its position restarts at `from`, whatever it started at.
    pub restart: bool,
}

impl Resumed {
    /// Only a control event: nothing retained to write.
    pub fn control(generation: u64, from: u64, control: Control) -> Self {
        Self {
            generation,
            from,
            open: Some(control),
            seam: None,
            events: Vec::new(),
            tail: None,
            restart: false,
        }
    }

    /// This plan for a stream held since it opened (`restart`), opening
    /// with `open` when it has no opening of its own.
    pub fn held(mut self, restart: bool, open: Option<Control>) -> Self {
        self.restart = restart;
        if self.open.is_none() {
            self.open = open;
        }
        self
    }

    /// Nothing: the hold ends and live delivery goes on.
    pub fn nothing(generation: u64, from: u64, open: Option<Control>) -> Self {
        Self {
            generation,
            from,
            open,
            seam: None,
            events: Vec::new(),
            tail: None,
            restart: false,
        }
    }
}

/// One entry of a stream's resume part.
#[derive(Debug)]
enum Replayed {
    /// A replayed event.
    Event(Queued),
    /// A control event, encoded already (a later resume's opening).
    Frame(Bytes),
    /// A control event naming the last event written before it (a replay
    /// that stopped short).
    Tail(Control),
}

/// Told when a stream is asked to close and when it has ended, so that the
/// connection carrying it can be dropped if it does not end in time (its
/// client stopped reading, so it cannot write its closing event). The
/// listener gives each stream its connection's; the stream never interprets it.
pub trait CloseWatch: Send + Sync {
    /// Stream `stream` was asked to close and should end `within`.
    fn closing(&self, stream: u64, within: Duration);
    /// Stream `stream` has ended.
    fn ended(&self, stream: u64);
}

/// The router-facing half of a stream.
pub struct StreamHandle {
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
    /// The dialect it speaks.
    pub dialect: Dialect,
    queue: Mutex<Queue>,
    capacity: usize,
    close: Mutex<Option<Close>>,
    closing: AtomicBool,
    gap: Mutex<Option<GapReason>>,
    /// Set when `close` or `gap` changed, so the stream looks at them (and
    /// takes their locks) only then.
    signalled: AtomicBool,
    waker: AtomicWaker,
    last_dispatched: AtomicU64,
    /// The id of the last event written (kept by the writer): where an
    /// in-place resume starts.
    written: AtomicU64,
    /// Set while a resume is being read: live events wait in the queue.
    resuming: AtomicBool,
    /// Counts holds: each [`pause`](StreamHandle::pause) starts a new one.
    pauses: AtomicU64,
    /// The resume, once read.
    resumed: Mutex<Option<Resumed>>,
    close_timeout: Duration,
    watch: Option<Arc<dyn CloseWatch>>,
    metrics: Arc<Metrics>,
}

impl StreamHandle {
    /// Whether any registration wants this event.
    #[inline]
    pub fn wants(&self, key: &EventKey) -> bool {
        self.interests.iter().any(|i| i.matches(key))
    }

    /// Marks event `seq` as dispatched to this stream; `false` if it already
    /// was (another of its registrations matched), so it is queued only once.
    #[inline]
    pub fn mark_dispatched(&self, seq: u64) -> bool {
        self.last_dispatched.swap(seq, Ordering::Relaxed) != seq
    }

    /// Queues an event without blocking; a full queue closes the stream.
    pub fn push(&self, event: Queued) -> Push {
        if self.is_closing() {
            return Push::Closed;
        }
        let mut q = self.queue.lock();
        if q.ended {
            return Push::Closed;
        }
        if q.events.len() >= self.capacity {
            drop(q);
            self.metrics
                .events_dropped
                .with_label_values(&["slow_consumer"])
                .inc();
            self.close(Close::SlowConsumer);
            return Push::Overflow;
        }
        q.events.push_back(event);
        drop(q);
        self.waker.wake();
        Push::Queued
    }

    /// Asks the stream to end with `reason`. The first reason wins; returns
    /// whether this call set it.
    pub fn close(&self, reason: Close) -> bool {
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
        if let Some(w) = &self.watch {
            w.closing(self.id, self.close_timeout);
        }
        // Wakes the writer's task, which also watches for a stuck close.
        self.waker.wake();
        true
    }

    /// Tells the client that events may have been missed (an outage of the
    /// bus, a dropped NATS message): it gets a `gap` event, the stream goes on.
    /// Several notices before the client reads collapse into one.
    pub fn notify_gap(&self, reason: GapReason) {
        *self.gap.lock() = Some(reason);
        self.signalled.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Holds live events in the queue until [`resume_with`](Self::resume_with)
    /// hands over a resume read for this hold (or a later one): a resume is
    /// being read. Returns the hold's generation.
    pub fn pause(&self) -> u64 {
        // Counted before the flag is raised: a plan the stream takes while
        // the flag is up is judged against this hold or a newer one.
        let generation = self.pauses.fetch_add(1, Ordering::AcqRel) + 1;
        self.resuming.store(true, Ordering::Release);
        generation
    }

    /// The latest hold's generation.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Acquire)
    }

    /// Whether the stream is closing or gone: nothing more is worth
    /// reading for it.
    pub fn is_finished(&self) -> bool {
        self.is_closing() || self.queue.lock().ended
    }

    /// Whether live events are held for a resume.
    pub fn is_paused(&self) -> bool {
        self.resuming.load(Ordering::Acquire)
    }

    /// Hands the stream its resume; it writes it, then the held live events.
    pub fn resume_with(&self, resumed: Resumed) {
        *self.resumed.lock() = Some(resumed);
        self.waker.wake();
    }

    /// The id of the last event the stream wrote (or the id it resumed
    /// from); 0 before either.
    pub fn position(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        // An atomic, not the `close` lock: every push on the hot path asks.
        self.closing.load(Ordering::Acquire)
    }

    /// Events waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.lock().events.len()
    }
}

/// A stream's queue: events in dispatch order, and whether the stream ended
/// (nothing more is accepted). Empty, it holds no memory.
struct Queue {
    events: VecDeque<Queued>,
    ended: bool,
}

/// Settings for a new stream.
pub struct StreamSettings {
    /// The dialect it speaks.
    pub dialect: Dialect,
    /// Queue capacity, in events.
    pub queue_frames: usize,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// The first `retry:` hint.
    pub retry: Duration,
    /// Time until the token expires.
    pub expires_in: Duration,
    /// The longest the stream lives before it is told to reconnect
    /// (`stream.max_lifetime`), if bounded.
    pub max_lifetime: Option<Duration>,
    /// How long a closing stream may take to end before its connection is dropped.
    pub close_timeout: Duration,
    /// Whether a new stream's position starts at the bus's newest event
    /// (a remembered stream: its position is saved even before it writes
    /// anything), not at 0.
    pub starts_at_head: bool,
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

/// When a stream opened `now` ends by itself, and with what: the token's
/// expiry, or a `reconnect` at a jittered point between 90% and 100% of its
/// lifetime (so that streams opened together do not all come back together).
fn end_of(now: Instant, settings: &StreamSettings) -> (Instant, Close) {
    let expires = deadline_after(now, settings.expires_in);
    let Some(lifetime) = settings.max_lifetime else {
        return (expires, Close::TokenExpired);
    };
    let ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
    let jittered = rand::thread_rng().gen_range(ms - ms / 10..=ms);
    let lifetime_end = deadline_after(now, Duration::from_millis(jittered));
    if lifetime_end < expires {
        let close = Close::Reconnect {
            reason: ReconnectReason::MaxLifetime,
            retry_ms: jittered_retry_ms(settings.retry),
        };
        (lifetime_end, close)
    } else {
        (expires, Close::TokenExpired)
    }
}

/// Deliveries buffered in a stream's local metrics before they are flushed.
const METRIC_FLUSH_EVERY: u32 = 64;

/// What a stream has to write next. The writer turns it into bytes: an
/// event in the stream's dialect (`Delivery::encoded`), the control or
/// opening bytes as given, or the dialect's heartbeat.
#[derive(Debug)]
pub enum Item {
    /// An event.
    Event(Arc<Delivery>),
    /// Bytes the protocol made for this stream (its opening, a control event).
    Frame(Bytes),
    /// The dialect's heartbeat.
    Heartbeat,
    /// The dialect's end line, after a closing event ([`Dialect::end_line`]).
    EndLine,
}

/// The writer-facing half of a stream.
pub struct SseStream {
    handle: Arc<StreamHandle>,
    dialect: Dialect,
    /// What is written before anything else: the opening and the control
    /// events of a resume.
    preamble: VecDeque<Bytes>,
    /// The resumes' part after the preamble, in order: replayed events and
    /// the control events between and after them.
    replay: VecDeque<Replayed>,
    /// Queued events up to this id were written by the resume (or were the
    /// client's already): skipped, so the seam has no duplicate.
    seam: u64,
    /// The id of the last event written (what a `gap` names).
    last_written: u64,
    /// One timer for both the next heartbeat and the stream's end.
    timer: Pin<Box<Sleep>>,
    /// The task the timer will wake, once polled since its last reset.
    timer_armed_for: Option<std::task::Waker>,
    heartbeat_every: Duration,
    next_heartbeat: Instant,
    /// When the stream ends by itself, and how: its token's expiry or its
    /// lifetime, whichever comes first.
    ends_at: Instant,
    end: Close,
    done: bool,
    /// The end line is still to be written after the closing event.
    end_line_due: bool,
    starts_at_head: bool,
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
    /// Instance-unique stream id.
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
    watch: Option<Arc<dyn CloseWatch>>,
    authorizer: Arc<Authorizer>,
    metrics: Arc<Metrics>,
) -> (Arc<StreamHandle>, SseStream) {
    let Subscriber {
        id,
        identity,
        project,
        interests,
    } = who;
    let handle = Arc::new(StreamHandle {
        id,
        identity,
        project,
        interests: interests.into_boxed_slice(),
        opened_at: SystemTime::now(),
        dialect: settings.dialect,
        queue: Mutex::new(Queue {
            events: VecDeque::new(),
            ended: false,
        }),
        capacity: settings.queue_frames,
        close: Mutex::new(None),
        closing: AtomicBool::new(false),
        gap: Mutex::new(None),
        signalled: AtomicBool::new(false),
        waker: AtomicWaker::new(),
        last_dispatched: AtomicU64::new(0),
        written: AtomicU64::new(0),
        resuming: AtomicBool::new(false),
        pauses: AtomicU64::new(0),
        resumed: Mutex::new(None),
        close_timeout: settings.close_timeout,
        watch,
        metrics: metrics.clone(),
    });
    let now = Instant::now();
    let next_heartbeat = deadline_after(now, settings.heartbeat);
    let (ends_at, end) = end_of(now, settings);
    metrics.connections.inc();
    let stream = SseStream {
        handle: handle.clone(),
        dialect: settings.dialect,
        preamble: settings
            .dialect
            .opening(settings.retry)
            .into_iter()
            .collect(),
        replay: VecDeque::new(),
        seam: 0,
        last_written: 0,
        timer: Box::pin(tokio::time::sleep_until(next_heartbeat.min(ends_at))),
        timer_armed_for: None,
        heartbeat_every: settings.heartbeat,
        next_heartbeat,
        ends_at,
        end,
        done: false,
        end_line_due: false,
        starts_at_head: settings.starts_at_head,
        delivered: metrics.events_delivered.local(),
        latency: metrics.delivery_latency.local(),
        unflushed: 0,
        metrics,
        authorizer,
        _guards: Vec::new(),
    };
    (handle, stream)
}

impl SseStream {
    /// Writes `control` before anything else, naming `last_event_id` (a
    /// resume's `gap`: the id the client resumed from).
    pub fn open_with(&mut self, control: &Control, last_event_id: u64) {
        let bytes = self.dialect.encode_control(control, last_event_id);
        self.preamble.push_back(bytes);
    }

    /// Writes `control` after the replayed events (a replay that stopped
    /// short), naming the last of them.
    pub fn after_replay(&mut self, control: Control) {
        self.replay.push_back(Replayed::Tail(control));
    }

    /// Appends a replayed event, written after the preamble and before live ones.
    pub fn push_replay(&mut self, event: Queued) {
        self.replay.push_back(Replayed::Event(event));
    }

    /// The resume point: queued events up to `seq` are skipped (the client
    /// has them, or the replay writes them), so the seam between replay and
    /// live delivery has no duplicate.
    pub fn set_seam(&mut self, seq: u64) {
        self.seam = self.seam.max(seq);
        if self.replay.is_empty() {
            self.set_written(self.last_written.max(seq));
        }
        // Otherwise once the replay is written out (`poll_resume`): the
        // position never runs ahead of what was written.
    }

    /// The client has every event up to `id` (its `Last-Event-ID`): a
    /// resume is being read, and a close meanwhile names `id`.
    pub fn start_after(&mut self, id: u64) {
        self.set_written(id);
    }

    fn set_written(&mut self, seq: u64) {
        self.last_written = seq;
        self.handle.written.store(seq, Ordering::Release);
    }

    /// Writes a resume: its opening control, the retained events this
    /// stream has not written yet, its tail; live events it covers are
    /// skipped. Live delivery, held for it, goes on.
    pub fn apply_resume(&mut self, r: Resumed) {
        if r.generation < self.handle.pauses() {
            // Read for an earlier hold: the newer one's plan covers it.
            return;
        }
        if r.restart && self.replay.is_empty() {
            self.set_written(r.from);
        }
        let written = self.last_written.max(r.from);
        if let Some(c) = &r.open {
            if self.replay.is_empty() {
                self.open_with(c, r.from);
            } else {
                // An earlier resume is still being written: this one's
                // opening follows it.
                let bytes = self.dialect.encode_control(c, r.from);
                self.replay.push_back(Replayed::Frame(bytes));
            }
        }
        if let Some(seam) = r.seam {
            self.replay.extend(
                r.events
                    .into_iter()
                    .filter(|e| e.delivery.seq > written)
                    .map(Replayed::Event),
            );
            if let Some(t) = r.tail {
                self.after_replay(t);
            }
            // After the events: the position reaches the seam only once
            // they are written.
            self.set_seam(seam.max(r.from));
        }
        self.handle.resuming.store(false, Ordering::Release);
        // A hold that began meanwhile stays.
        if self.handle.pauses() > r.generation {
            self.handle.resuming.store(true, Ordering::Release);
        }
    }

    /// Takes a resume handed over by [`StreamHandle::resume_with`]; `true`
    /// while live events are still held for one.
    fn poll_paused(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.handle.resuming.load(Ordering::Acquire) {
            return false;
        }
        self.handle.waker.register(cx.waker());
        let Some(r) = self.handle.resumed.lock().take() else {
            return true;
        };
        self.apply_resume(r);
        false
    }

    /// Keeps `guard` alive as long as the stream.
    pub fn hold(&mut self, guard: Box<dyn Send + Sync>) {
        self._guards.push(guard);
    }

    /// The router-facing half.
    pub fn handle(&self) -> &Arc<StreamHandle> {
        &self.handle
    }

    /// Whether a new stream's position starts at the bus's newest event
    /// ([`StreamSettings::starts_at_head`]).
    pub fn starts_at_head(&self) -> bool {
        self.starts_at_head
    }

    /// The dialect the stream speaks.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Whether the stream has written its closing event.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn next_queued(&mut self) -> Option<Queued> {
        self.handle.queue.lock().events.pop_front()
    }

    /// The next queued event; with none, registers for the next push (under
    /// the queue's lock, so a push cannot slip in between).
    fn next_queued_or_register(&mut self, cx: &mut Context<'_>) -> Option<Queued> {
        let mut q = self.handle.queue.lock();
        let f = q.events.pop_front();
        if f.is_none() {
            self.handle.waker.register(cx.waker());
        }
        f
    }

    /// Nothing to write: the waker is registered for pushes (see
    /// `next_queued_or_register`); a notice that was signalled before it was
    /// registered is looked at again right away.
    fn sleep(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if self.handle.signalled.load(Ordering::Acquire) {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn finish(&mut self, reason: Close) -> Poll<Option<Item>> {
        self.flush_metrics();
        self.done = true;
        self.end_line_due = self.dialect.end_line().is_some();
        self.handle.queue.lock().ended = true;
        let bytes = self
            .dialect
            .encode_control(&Control::Close(reason), self.last_written);
        Poll::Ready(Some(Item::Frame(bytes)))
    }

    /// A live event to write, if it is to be written: not at or before the
    /// seam (the resume wrote it, or the client had it).
    fn deliver_live(&mut self, event: Queued) -> Option<Item> {
        if event.delivery.seq <= self.seam {
            return None;
        }
        self.deliver(event)
    }

    /// The event to write, if the policy in force still allows it.
    fn deliver(&mut self, event: Queued) -> Option<Item> {
        let d = &event.delivery;
        // The policy changed since this event was allowed: ask again, so
        // nothing the policy in force denies is ever written.
        if event.generation != self.authorizer.generation()
            && !self.authorizer.may_receive(&self.handle.identity, d.key())
        {
            self.metrics
                .permission_denied
                .with_label_values(&["delivery"])
                .inc();
            return None;
        }
        self.set_written(d.seq);
        self.delivered.inc();
        self.latency.observe(d.accepted_at.elapsed().as_secs_f64());
        self.unflushed += 1;
        if self.unflushed >= METRIC_FLUSH_EVERY {
            self.flush_metrics();
        }
        Some(Item::Event(event.delivery))
    }

    fn flush_metrics(&mut self) {
        self.delivered.flush();
        self.latency.flush();
        self.unflushed = 0;
    }

    /// The resume's part: preamble, replayed events, the replay's tail.
    fn poll_resume(&mut self) -> Option<Item> {
        if let Some(b) = self.preamble.pop_front() {
            return Some(Item::Frame(b));
        }
        while let Some(r) = self.replay.pop_front() {
            match r {
                Replayed::Event(f) => {
                    if let Some(item) = self.deliver(f) {
                        return Some(item);
                    }
                }
                Replayed::Frame(b) => return Some(Item::Frame(b)),
                // Names the last event written before it.
                Replayed::Tail(c) => {
                    return Some(Item::Frame(
                        self.dialect.encode_control(&c, self.last_written),
                    ))
                }
            }
        }
        if self.seam > self.last_written {
            // The replay is written out: the client has everything up to
            // the seam.
            self.set_written(self.seam);
        }
        // Written out: an idle stream keeps no buffers.
        if self.preamble.capacity() > 0 || self.replay.capacity() > 0 {
            self.preamble = VecDeque::new();
            self.replay = VecDeque::new();
        }
        None
    }

    /// A signalled close or gap: looked at only when signalled.
    fn poll_signals(&mut self) -> Option<Poll<Option<Item>>> {
        if !self.handle.signalled.swap(false, Ordering::AcqRel) {
            return None;
        }
        let closing = self.handle.close.lock().clone();
        if let Some(reason) = closing {
            self.handle.signalled.store(true, Ordering::Release); // terminal
                                                                  // Held events are not flushed: their resume was not written.
            if reason.flushes_queue() && !self.handle.resuming.load(Ordering::Acquire) {
                while let Some(f) = self.next_queued() {
                    if let Some(item) = self.deliver_live(f) {
                        return Some(Poll::Ready(Some(item)));
                    }
                }
            }
            return Some(self.finish(reason));
        }
        let gap = self.handle.gap.lock().take();
        gap.map(|reason| {
            let bytes = self
                .dialect
                .encode_control(&Control::Gap(reason), self.last_written);
            Poll::Ready(Some(Item::Frame(bytes)))
        })
    }

    /// The timer: a heartbeat when it is due, the end when the token expired.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        // The timer is polled only when it may have fired, or has never been
        // polled by this task: once polled it wakes the task by itself.
        let armed = self
            .timer_armed_for
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if armed && !self.timer.is_elapsed() {
            return self.sleep(cx);
        }
        self.timer_armed_for = None;
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if now < self.ends_at {
                let heartbeat = now >= self.next_heartbeat;
                if heartbeat {
                    self.next_heartbeat = deadline_after(now, self.heartbeat_every);
                }
                let next = self.next_heartbeat.min(self.ends_at);
                self.timer.as_mut().reset(next);
                if heartbeat {
                    self.flush_metrics();
                    return Poll::Ready(Some(Item::Heartbeat));
                }
                continue;
            }
            self.handle.close(self.end.clone());
            // Another reason may have won the race; end with whichever did.
            let reason = self
                .handle
                .close
                .lock()
                .clone()
                .unwrap_or_else(|| self.end.clone());
            return self.finish(reason);
        }
        self.timer_armed_for = Some(cx.waker().clone());
        self.sleep(cx)
    }

    /// The next thing to write; `Ready(None)` after the closing event.
    /// Priority: the resume's part, then signals (close, gap), then queued
    /// events, then the timer.
    pub fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if self.done {
            if std::mem::take(&mut self.end_line_due) {
                return Poll::Ready(Some(Item::EndLine));
            }
            return Poll::Ready(None);
        }
        let paused = self.poll_paused(cx);
        if let Some(item) = self.poll_resume() {
            return Poll::Ready(Some(item));
        }
        if self.dialect.heartbeat_is_liveness() && !paused {
            // A client that counts only heartbeats as liveness gets one on
            // time even while events keep the queue from emptying.
            let now = Instant::now();
            if now >= self.next_heartbeat {
                self.next_heartbeat = deadline_after(now, self.heartbeat_every);
                return Poll::Ready(Some(Item::Heartbeat));
            }
        }
        loop {
            if let Some(ready) = self.poll_signals() {
                return ready;
            }
            if paused {
                break; // live events wait for the resume
            }
            match self.next_queued_or_register(cx) {
                Some(f) => {
                    if let Some(item) = self.deliver_live(f) {
                        return Poll::Ready(Some(item));
                    }
                }
                None => break,
            }
        }
        self.poll_timer(cx)
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        self.flush_metrics();
        if let Some(w) = &self.handle.watch {
            w.ended(self.handle.id);
        }
        self.metrics.connections.dec();
        // Events still queued are lost with the stream: count them.
        let backlog = {
            let mut q = self.handle.queue.lock();
            q.ended = true;
            std::mem::take(&mut q.events).len() as u64
        };
        let closing = self.handle.close.lock().clone();
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

/// `[stream]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Interval of the comment heartbeat on idle streams.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The `retry:` hint sent first on every stream.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// Frames one connection may have queued before it is closed as a slow consumer.
    pub queue_frames: usize,
    /// Events kept in memory for `Last-Event-ID` resume: the embedded bus's
    /// ring (in `[stream]` for compatibility; NATS replay is `[replay]`).
    pub replay_buffer: usize,
    /// How long a stream being closed may take to write its last event before
    /// its connection is dropped (a client that stopped reading).
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// The longest a stream stays open before it is told to `reconnect`
    /// (jittered down to 90%), so that streams spread over instances added
    /// since; `0s` keeps streams open for as long as their token lasts.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            queue_frames: 1024,
            replay_buffer: 10_000,
            close_timeout: Duration::from_secs(10),
            max_lifetime: Duration::ZERO,
        }
    }
}

impl StreamConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        setting::at_least("stream.queue_frames", self.queue_frames, 2)?;
        setting::duration(
            "stream.heartbeat",
            self.heartbeat,
            Duration::from_millis(100),
            setting::MAX_DURATION,
        )?;
        setting::duration(
            "stream.retry",
            self.retry,
            Duration::ZERO,
            setting::MAX_DURATION,
        )?;
        setting::duration(
            "stream.close_timeout",
            self.close_timeout,
            Duration::ZERO,
            setting::MAX_DURATION,
        )?;
        setting::duration(
            "stream.max_lifetime",
            self.max_lifetime,
            Duration::ZERO,
            setting::MAX_DURATION,
        )?;
        if !self.max_lifetime.is_zero() && self.max_lifetime < Duration::from_secs(1) {
            return Err(setting::invalid(
                "stream.max_lifetime",
                "must be 0s (unbounded) or at least 1s",
            ));
        }
        Ok(())
    }

    /// `max_lifetime` as a bound, if one is set.
    pub fn lifetime(&self) -> Option<Duration> {
        (!self.max_lifetime.is_zero()).then_some(self.max_lifetime)
    }
}

#[cfg(test)]
impl StreamSettings {
    /// Settings for tests: 8 queued events, an hour of heartbeat and token.
    pub(crate) fn for_tests(dialect: Dialect) -> Self {
        Self {
            dialect,
            queue_frames: 8,
            heartbeat: Duration::from_secs(3600),
            retry: Duration::from_secs(1),
            expires_in: Duration::from_secs(3600),
            max_lifetime: None,
            close_timeout: Duration::from_secs(10),
            starts_at_head: false,
        }
    }
}

/// A stream of `reader` on project p1, for other modules' tests.
#[cfg(test)]
pub(crate) async fn test_stream() -> (Arc<StreamHandle>, SseStream) {
    let metrics = Arc::new(Metrics::new());
    let auth = Arc::new(
        Authorizer::new(
            &crate::policy::PolicySource::shipped(),
            100,
            metrics.clone(),
        )
        .await
        .expect("the shipped policy compiles"),
    );
    let settings = StreamSettings {
        starts_at_head: true,
        ..StreamSettings::for_tests(Dialect::Infisical)
    };
    let who = Subscriber {
        id: 1,
        identity: Principal::parse("reader").expect("an identity"),
        project: ProjectId::parse("p1").expect("a project"),
        interests: Vec::new(),
    };
    new_stream(who, &settings, None, auth, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::path::PathPattern;
    use crate::policy::PolicySource;

    struct Fixture {
        auth: Arc<Authorizer>,
        metrics: Arc<Metrics>,
        handle: Arc<StreamHandle>,
        stream: SseStream,
    }

    fn source(policy: &str) -> PolicySource {
        let mut s = PolicySource::shipped();
        s.policy = policy.into();
        s
    }

    /// A stream of `identity` on project p1 for every secret:created event.
    async fn fixture(policy: &str, identity: &str, queue_frames: usize) -> Fixture {
        fixture_in(
            policy,
            identity,
            queue_frames,
            Dialect::Native,
            Duration::from_secs(3600),
        )
        .await
    }

    async fn fixture_in(
        policy: &str,
        identity: &str,
        queue_frames: usize,
        dialect: Dialect,
        heartbeat: Duration,
    ) -> Fixture {
        let metrics = Arc::new(Metrics::new());
        let auth = Arc::new(
            Authorizer::new(&source(policy), 100, metrics.clone())
                .await
                .unwrap(),
        );
        let settings = StreamSettings {
            dialect,
            queue_frames,
            heartbeat,
            retry: Duration::from_secs(1),
            expires_in: Duration::from_secs(3600),
            max_lifetime: None,
            close_timeout: Duration::from_secs(10),
            starts_at_head: false,
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
        let (handle, stream) = new_stream(who, &settings, None, auth.clone(), metrics.clone());
        Fixture {
            auth,
            metrics,
            handle,
            stream,
        }
    }

    fn queued(seq: u64, path: &str, generation: u64) -> Queued {
        Queued {
            delivery: crate::delivery::tests::delivery(seq, "p1", path),
            generation,
        }
    }

    /// The next item as bytes (a hyper-like writer), `None` at the end.
    async fn next_data(s: &mut SseStream) -> Option<Bytes> {
        let item = std::future::poll_fn(|cx| s.poll_item(cx)).await?;
        Some(match item {
            Item::Event(d) => d.encoded(s.dialect()).frame().clone(),
            Item::Frame(b) => b,
            Item::Heartbeat => Bytes::from_static(s.dialect().heartbeat()),
            Item::EndLine => Bytes::from_static(s.dialect().end_line().unwrap_or_default()),
        })
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

    #[tokio::test]
    async fn a_liveness_heartbeat_is_written_while_events_keep_coming() {
        let allow = "p, alice, *, *, subscribe, *, /**, allow\n";
        let beat = Duration::from_millis(30);
        let mut f = fixture_in(allow, "alice", 64, Dialect::Infisical, beat).await;
        let mut pings = 0;
        let started = Instant::now();
        let mut seq = 0;
        // The queue never empties: one more event for each one written.
        f.handle.push(queued(1, "/a", 1));
        while started.elapsed() < Duration::from_millis(200) {
            seq += 1;
            f.handle.push(queued(seq + 1, "/a", 1));
            let b = next_data(&mut f.stream).await.unwrap();
            if &b[..] == b"event: ping\n\n" {
                pings += 1;
            }
        }
        assert!(pings >= 3, "{pings} pings in 200 ms of events");
        // The native dialect does not interleave them (any byte is liveness).
        let mut n = fixture_in(allow, "alice", 64, Dialect::Native, beat).await;
        let started = Instant::now();
        n.handle.push(queued(1, "/a", 1));
        let mut seq = 0;
        while started.elapsed() < Duration::from_millis(100) {
            seq += 1;
            n.handle.push(queued(seq + 1, "/a", 1));
            let b = next_data(&mut n.stream).await.unwrap();
            assert_ne!(&b[..], b":\n\n");
        }
    }

    #[tokio::test]
    async fn events_queued_before_a_policy_swap_are_checked_again() {
        let mut f = fixture("p, alice, *, *, subscribe, *, /**, allow\n", "alice", 8).await;
        // Both allowed under generation 1 and queued.
        assert_eq!(f.handle.push(queued(1, "/public", 1)), Push::Queued);
        assert_eq!(f.handle.push(queued(2, "/secret", 1)), Push::Queued);
        // The policy now denies /secret before the events are written.
        f.auth
            .reload(&source("p, alice, *, *, subscribe, *, /**, allow\np, alice, *, *, subscribe, *, /secret/**, deny\n"))
            .await
            .unwrap();
        assert_eq!(
            next_data(&mut f.stream).await.unwrap(),
            Bytes::from("retry: 1000\n\n")
        );
        assert_eq!(id_of(&next_data(&mut f.stream).await.unwrap()), Some(1));
        assert_eq!(f.handle.push(queued(3, "/public/x", 2)), Push::Queued);
        assert_eq!(
            id_of(&next_data(&mut f.stream).await.unwrap()),
            Some(3),
            "event 2 was dropped"
        );
    }

    /// The next item if one is ready now.
    fn ready_now(s: &mut SseStream) -> Option<Option<Bytes>> {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match s.poll_item(&mut cx) {
            Poll::Ready(Some(Item::Event(d))) => Some(Some(d.encoded(s.dialect()).frame().clone())),
            Poll::Ready(Some(Item::Frame(b))) => Some(Some(b)),
            Poll::Ready(Some(Item::Heartbeat)) => {
                Some(Some(Bytes::from_static(s.dialect().heartbeat())))
            }
            Poll::Ready(Some(Item::EndLine)) => Some(Some(Bytes::from_static(
                s.dialect().end_line().unwrap_or_default(),
            ))),
            Poll::Ready(None) => Some(None),
            Poll::Pending => None,
        }
    }

    fn plan(generation: u64, from: u64, through: u64, events: Vec<Queued>) -> Resumed {
        Resumed {
            generation,
            from,
            open: None,
            seam: Some(through),
            events,
            tail: None,
            restart: false,
        }
    }

    #[tokio::test]
    async fn a_held_stream_writes_its_resume_before_what_arrived_live() {
        let mut f = fixture("p, a, *, *, subscribe, *, /**, allow\n", "a", 8).await;
        let _retry = next_data(&mut f.stream).await;
        assert_eq!(f.handle.push(queued(1, "/", 1)), Push::Queued);
        assert_eq!(id_of(&next_data(&mut f.stream).await.unwrap()), Some(1));
        // The link fails; 2 and 3 are missed; 4 and 5 arrive live after it
        // is back, before the resume is read: held.
        let hold = f.handle.pause();
        assert_eq!(f.handle.push(queued(4, "/", 1)), Push::Queued);
        assert_eq!(f.handle.push(queued(5, "/", 1)), Push::Queued);
        assert!(ready_now(&mut f.stream).is_none(), "held");
        assert_eq!(f.handle.position(), 1);
        // The resume (read after 4 was stored) has 2, 3 and 4.
        f.handle.resume_with(plan(
            hold,
            1,
            4,
            vec![queued(2, "/", 1), queued(3, "/", 1), queued(4, "/", 1)],
        ));
        let mut ids = Vec::new();
        while let Some(Some(b)) = ready_now(&mut f.stream) {
            ids.push(id_of(&b).unwrap());
        }
        assert_eq!(ids, vec![2, 3, 4, 5], "in order, once");
        assert_eq!(f.handle.position(), 5);
    }

    #[tokio::test]
    async fn a_resume_read_for_an_earlier_hold_is_dropped() {
        let mut f = fixture("p, a, *, *, subscribe, *, /**, allow\n", "a", 8).await;
        let _retry = next_data(&mut f.stream).await;
        let first = f.handle.pause();
        // A second outage before the first resume was read.
        let second = f.handle.pause();
        assert!(second > first);
        f.handle
            .resume_with(plan(first, 0, 2, vec![queued(2, "/", 1)]));
        assert!(ready_now(&mut f.stream).is_none(), "still held");
        assert_eq!(f.handle.push(queued(9, "/", 1)), Push::Queued);
        f.handle.resume_with(plan(
            second,
            0,
            3,
            vec![queued(2, "/", 1), queued(3, "/", 1)],
        ));
        let mut ids = Vec::new();
        while let Some(Some(b)) = ready_now(&mut f.stream) {
            ids.push(id_of(&b).unwrap());
        }
        assert_eq!(ids, vec![2, 3, 9]);
    }

    #[tokio::test]
    async fn a_second_resume_is_written_after_the_first_with_every_control() {
        let mut f = fixture("p, a, *, *, subscribe, *, /**, allow\n", "a", 8).await;
        let _retry = next_data(&mut f.stream).await;
        // The first resume stopped short (a tail gap) and is not written
        // yet when a second one, which found the id expired, arrives.
        let first = f.handle.pause();
        let mut a = plan(first, 0, 5, vec![queued(1, "/", 1), queued(2, "/", 1)]);
        a.tail = Some(Control::Gap(GapReason::TooFarBehind));
        f.stream.apply_resume(a);
        let second = f.handle.pause();
        let mut b = plan(second, 5, 7, vec![queued(6, "/", 1), queued(7, "/", 1)]);
        b.open = Some(Control::Gap(GapReason::Expired));
        f.handle.resume_with(b);
        let mut seen = Vec::new();
        while let Some(Some(bytes)) = ready_now(&mut f.stream) {
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            seen.push(match id_of(&bytes) {
                Some(id) => id.to_string(),
                None if text.contains("too_far_behind") => "tail".into(),
                None if text.contains("expired") => "expired".into(),
                None => text,
            });
        }
        assert_eq!(seen, ["1", "2", "tail", "expired", "6", "7"]);
    }

    #[tokio::test]
    async fn a_close_while_held_does_not_flush_what_waits_for_the_resume() {
        let mut f = fixture("p, a, *, *, subscribe, *, /**, allow\n", "a", 8).await;
        let _retry = next_data(&mut f.stream).await;
        f.handle.pause();
        assert_eq!(f.handle.push(queued(7, "/", 1)), Push::Queued);
        f.handle.close(Close::Reconnect {
            reason: ReconnectReason::Draining,
            retry_ms: 1000,
        });
        let last = next_data(&mut f.stream).await.unwrap();
        let last = String::from_utf8(last.to_vec()).unwrap();
        assert!(last.contains("event: reconnect"), "{last:?}");
        assert!(!last.contains("id: 7"), "{last:?}");
        assert!(next_data(&mut f.stream).await.is_none());
    }

    #[tokio::test]
    async fn overflow_closes_with_slow_consumer() {
        let mut f = fixture("p, a, *, *, subscribe, *, /**, allow\n", "a", 2).await;
        assert_eq!(f.handle.push(queued(1, "/", 1)), Push::Queued);
        assert_eq!(f.handle.push(queued(2, "/", 1)), Push::Queued);
        assert_eq!(f.handle.push(queued(3, "/", 1)), Push::Overflow);
        assert_eq!(f.handle.push(queued(4, "/", 1)), Push::Closed);
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
        assert_eq!(f.handle.push(queued(5, "/", 1)), Push::Queued);
        assert_eq!(id_of(&next_data(&mut f.stream).await.unwrap()), Some(5));
        f.handle.notify_gap(GapReason::BusReconnected);
        f.handle.notify_gap(GapReason::BusReconnected);
        let gap = next_data(&mut f.stream).await.unwrap();
        let text = std::str::from_utf8(&gap).unwrap();
        assert!(text.starts_with("event: gap\n"), "{text}");
        assert!(
            text.contains("\"lastEventId\":\"5\""),
            "it names the last id written: {text}"
        );
        assert_eq!(f.handle.push(queued(6, "/", 1)), Push::Queued);
        assert_eq!(id_of(&next_data(&mut f.stream).await.unwrap()), Some(6));
    }

    #[tokio::test]
    async fn the_seam_skips_what_the_resume_wrote_and_nothing_after() {
        let mut f = fixture("p, a, *, *, subscribe, *, /**, allow\n", "a", 8).await;
        f.stream.push_replay(queued(10, "/", 1));
        f.stream.set_seam(10);
        // Live copies of what the replay holds, then newer ones, in any order
        // the bus produced them: only the seam decides what is skipped.
        for seq in [9, 10, 12, 11] {
            f.handle.push(queued(seq, "/", 1));
        }
        let _retry = next_data(&mut f.stream).await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(id_of(&next_data(&mut f.stream).await.unwrap()).unwrap());
        }
        assert_eq!(ids, vec![10, 12, 11]);
    }
}
