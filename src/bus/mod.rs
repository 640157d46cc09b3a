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
pub mod nats;
pub mod replay;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use embedded::EmbeddedBus;
pub use nats::NatsBus;

use crate::event::Event;
use crate::stream::SseStream;

/// The result of publishing one event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    /// The event id.
    pub id: String,
    /// Its sequence number (the SSE `id`), when the bus assigns it at publish time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
}

/// Why a publish or an attach failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the event bus is unavailable: {0}")]
    Unavailable(String),
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

    /// Whether the bus can take publishes and new streams.
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Embedded(_) => true,
            Bus::Nats(b) => b.is_ready(),
        }
    }
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
