//! The event bus seam.
//!
//! A [`Bus`] accepts validated events from publishers and feeds the router; it
//! also attaches new streams (taking interest in what they registered for, and
//! replaying what they missed when they resume). Two implementations:
//!
//! - [`embedded`]: in process, with a replay ring; one instance, nothing else
//!   to run.
//! - [`nats`]: NATS subjects shared by many instances; each instance subscribes
//!   only to the subjects its streams need.

pub mod embedded;
pub mod link;
pub mod nats;
pub mod replay;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use embedded::EmbeddedBus;
pub use nats::NatsBus;

use crate::delivery::Delivery;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::protocol::{Control, GapReason};
use crate::router::Router;
use crate::stream::{Queued, Resumed, SseStream, StreamHandle};

/// The result of publishing one event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    /// The event id.
    pub id: String,
    /// Its sequence number (the SSE `id`), when the bus assigns it at publish time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// JetStream had stored this id already (a retried publish, or one
    /// source event ingested by two instances): it is stored once.
    #[serde(skip)]
    pub duplicate: bool,
}

/// What the bus could not do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusErrorKind {
    /// Not connected to NATS now.
    NotConnected,
    /// The replay stream is not set up (yet, or not as herald needs it).
    ReplayNotReady,
    /// The connection could not be configured or made.
    Connect,
    /// NATS refused or lost a publish.
    Publish,
    /// A subscription could not be made or confirmed.
    Subscribe,
    /// The replay stream could not be created, opened or read.
    Replay,
    /// NATS did not answer in time.
    Timeout,
}

impl BusErrorKind {
    fn describe(self) -> &'static str {
        match self {
            BusErrorKind::NotConnected => "not connected to NATS",
            BusErrorKind::ReplayNotReady => "the replay stream is not set up",
            BusErrorKind::Connect => "cannot connect to NATS",
            BusErrorKind::Publish => "NATS did not take the publish",
            BusErrorKind::Subscribe => "NATS did not take the subscription",
            BusErrorKind::Replay => "the replay stream could not be used",
            BusErrorKind::Timeout => "NATS did not answer in time",
        }
    }
}

/// Why a publish, an attach or the bus's set-up failed: a kind, what was
/// being done, and the client library's error when there is one (kept, not
/// flattened into a string).
#[derive(Debug)]
pub struct BusError {
    kind: BusErrorKind,
    doing: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BusError {
    /// An error of `kind`.
    pub fn new(kind: BusErrorKind) -> Self {
        Self {
            kind,
            doing: None,
            source: None,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(
        kind: BusErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            doing: None,
            source: Some(source.into()),
        }
    }

    /// Says what was being done (`"creating stream HERALD_EVENTS"`).
    pub fn doing(mut self, what: impl Into<String>) -> Self {
        self.doing = Some(what.into());
        self
    }

    /// What failed.
    pub fn kind(&self) -> BusErrorKind {
        self.kind
    }
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind.describe())?;
        if let Some(d) = &self.doing {
            write!(f, " ({d})")?;
        }
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BusError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The event bus in use.
pub enum Bus {
    /// In-process bus with a replay ring.
    Embedded(EmbeddedBus),
    /// NATS.
    Nats(Arc<NatsBus>),
}

impl Bus {
    /// Publishes validated events, in order.
    pub async fn publish(&self, events: Vec<Event>) -> Result<Vec<Published>, BusError> {
        match self {
            Bus::Embedded(b) => Ok(b.publish(events)),
            Bus::Nats(b) => b.publish(events).await,
        }
    }

    /// Attaches a stream: registers it with the router, takes interest in what
    /// it needs, and replays what it missed since `resume_from` (an SSE id).
    pub async fn attach(
        &self,
        stream: &mut SseStream,
        resume_from: Option<u64>,
    ) -> Result<(), BusError> {
        match self {
            Bus::Embedded(b) => {
                b.attach(stream, resume_from);
                Ok(())
            }
            Bus::Nats(b) => b.attach(stream, resume_from).await,
        }
    }

    /// Resumes an attached stream, held since before it was attached (hold
    /// `generation`, nothing written yet), from `after`: a position found
    /// once the stream was open (a remembered one). `open` is written
    /// first when the resume has no opening of its own.
    pub fn resume_held(
        &self,
        handle: &Arc<StreamHandle>,
        generation: u64,
        after: u64,
        open: Option<Control>,
    ) {
        match self {
            Bus::Embedded(b) => b.resume_held(handle, generation, after, open),
            Bus::Nats(b) => b.resume_held(handle.clone(), generation, after, open),
        }
    }

    /// Stops the bus's own tasks and waits for them, up to `deadline`.
    pub async fn close(&self, deadline: std::time::Duration) {
        if let Bus::Nats(b) = self {
            b.close(deadline).await;
        }
    }

    /// Whether the bus can take publishes and new streams.
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Embedded(_) => true,
            Bus::Nats(b) => b.is_ready(),
        }
    }
}

/// Where a resume id stands in what a bus retains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// Everything after it is retained.
    Known,
    /// Some events after it are no longer retained.
    Expired,
    /// It was never issued (ahead of anything retained).
    Unknown,
}

/// What a bus retains of one project after a resume id: the buses' one
/// offer to a resuming stream (the embedded ring, JetStream).
#[derive(Debug)]
pub struct Retained {
    /// Where the resume id stands.
    pub position: Position,
    /// The project's retained events after the id, in order.
    pub events: Vec<Arc<Delivery>>,
    /// Whether more were retained than one resume replays.
    pub truncated: bool,
    /// The newest sequence the read covers: live events up to it are the
    /// replay's to write (the seam).
    pub through: u64,
}

/// Plans a resume from `after` for a stream, the same way on every bus: the
/// `gap` its position calls for, then the retained events the stream may see
/// ([`Router::admits`], the one delivery predicate), then a `gap` when the
/// read stopped short; and the seam, so that live events the replay covers
/// are not written twice. The stream was registered with the router before
/// `retained` was read, so nothing after `through` is missed; it writes the
/// plan itself ([`SseStream::apply_resume`]), at once or once read.
pub fn plan_resume(
    handle: &StreamHandle,
    hold: u64,
    after: u64,
    retained: Retained,
    router: &Router,
    metrics: &Metrics,
) -> Resumed {
    let open = match retained.position {
        Position::Unknown => {
            return Resumed::control(hold, after, Control::Gap(GapReason::UnknownId))
        }
        Position::Expired => Some(Control::Gap(GapReason::Expired)),
        Position::Known => None,
    };
    // Read before deciding: an event is never tagged newer than its decision.
    let policy = router.policy_generation();
    let events: Vec<Queued> = retained
        .events
        .into_iter()
        .filter(|d| d.seq > after && router.admits(handle, d))
        .map(|delivery| Queued {
            delivery,
            generation: policy,
        })
        .collect();
    metrics.replayed_events.inc_by(events.len() as u64);
    Resumed {
        generation: hold,
        from: after,
        open,
        seam: Some(after.max(retained.through)),
        events,
        tail: retained
            .truncated
            .then_some(Control::Gap(GapReason::TooFarBehind)),
        restart: false,
    }
}

/// [`plan_resume`], written into `stream` now (a bus that reads what it
/// retains without waiting).
pub fn resume(
    stream: &mut SseStream,
    after: u64,
    retained: Retained,
    router: &Router,
    metrics: &Metrics,
) {
    let generation = stream.handle().pauses();
    let plan = plan_resume(
        stream.handle(),
        generation,
        after,
        retained,
        router,
        metrics,
    );
    stream.apply_resume(plan);
}

/// The first sequence number of a process: the current time in microseconds.
/// Ids stay increasing across restarts, so an id from an earlier process is
/// always older than anything retained now and gets `gap`, never a wrong replay.
pub fn first_sequence() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}
