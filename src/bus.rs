//! The event bus seam.
//!
//! A [`Bus`] accepts validated events from publishers and feeds the router; it
//! also attaches new streams, replaying what they missed when they resume. The
//! embedded bus (the default, used when no NATS is configured) does this in
//! process: it numbers events, encodes each once, keeps the last N in a ring
//! buffer for `Last-Event-ID` resume, and dispatches to the router.
//!
//! Publishing and attaching take the same lock, so a stream attached with a
//! resume point sees every later event exactly once: replayed ones before the
//! attach, live ones after it, none twice at the seam.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::json;

use crate::event::Event;
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::router::{Delivery, Router};
use crate::sse::{self, Control};
use crate::stream::{Frame, SseStream};

/// The result of publishing one event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    /// The event id.
    pub id: String,
    /// Its sequence number (the SSE `id`).
    pub sequence: u64,
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the event bus is unavailable: {0}")]
    Unavailable(String),
}

/// The event bus in use.
pub enum Bus {
    /// In-process bus with a replay ring.
    Embedded(EmbeddedBus),
}

impl Bus {
    /// Publishes validated events, in order.
    pub async fn publish(&self, events: Vec<Event>) -> Result<Vec<Published>, BusError> {
        match self {
            Bus::Embedded(b) => Ok(b.publish(events)),
        }
    }

    /// Attaches a stream to the router, after replaying what it missed since
    /// `resume_from` (an SSE id), if given.
    pub fn attach(&self, stream: &mut SseStream, resume_from: Option<u64>) {
        match self {
            Bus::Embedded(b) => b.attach(stream, resume_from),
        }
    }

    /// Whether the bus can take publishes.
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Embedded(_) => true,
        }
    }

    /// The router this bus feeds.
    pub fn router(&self) -> &Arc<Router> {
        match self {
            Bus::Embedded(b) => &b.router,
        }
    }
}

struct Ring {
    /// The sequence number the next event gets.
    next_seq: u64,
    events: VecDeque<Arc<Delivery>>,
    capacity: usize,
}

/// The in-process bus.
pub struct EmbeddedBus {
    ring: Mutex<Ring>,
    router: Arc<Router>,
    authorizer: Arc<Authorizer>,
    metrics: Arc<Metrics>,
}

impl EmbeddedBus {
    /// A bus keeping the last `replay_capacity` events.
    pub fn new(
        router: Arc<Router>,
        authorizer: Arc<Authorizer>,
        metrics: Arc<Metrics>,
        replay_capacity: usize,
    ) -> Self {
        // Start numbering at the current time in microseconds: ids stay
        // increasing across restarts, so an id from an earlier process is always
        // older than this ring and gets `gap` instead of a wrong replay.
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Self {
            ring: Mutex::new(Ring {
                next_seq: start,
                events: VecDeque::with_capacity(replay_capacity.min(65_536)),
                capacity: replay_capacity,
            }),
            router,
            authorizer,
            metrics,
        }
    }

    fn publish(&self, events: Vec<Event>) -> Vec<Published> {
        let mut out = Vec::with_capacity(events.len());
        let mut ring = self.ring.lock();
        for ev in events {
            let seq = ring.next_seq;
            ring.next_seq += 1;
            let d = Arc::new(Delivery {
                seq,
                frame: sse::event_frame(seq, ev.event_type.name(), &ev.json),
                project: ev.project,
                event_type: ev.event_type,
                env: ev.env,
                path: ev.path,
                accepted_at: Instant::now(),
            });
            self.metrics
                .events_received
                .with_label_values(&["api"])
                .inc();
            self.router.dispatch(&d);
            if ring.capacity > 0 {
                if ring.events.len() == ring.capacity {
                    ring.events.pop_front();
                }
                ring.events.push_back(d);
            }
            out.push(Published {
                id: ev.id,
                sequence: seq,
            });
        }
        out
    }

    fn attach(&self, stream: &mut SseStream, resume_from: Option<u64>) {
        let ring = self.ring.lock();
        let newest = ring.next_seq - 1;
        if let Some(last) = resume_from {
            let oldest = ring.events.front().map(|d| d.seq).unwrap_or(ring.next_seq);
            if last > newest {
                stream.push_preamble(sse::control_frame(
                    Control::Gap,
                    &json!({"reason": "unknown_id", "lastEventId": last.to_string(),
                            "message": "this id was not issued by this instance; resync"}),
                    None,
                ));
            } else {
                if last + 1 < oldest {
                    stream.push_preamble(sse::control_frame(
                        Control::Gap,
                        &json!({"reason": "expired", "lastEventId": last.to_string(),
                                "message": "events after this id are no longer retained; resync"}),
                        None,
                    ));
                }
                // Nothing at or before the resume point is written again.
                stream.set_last_seq(last);
                let skip = (last + 1).saturating_sub(oldest) as usize;
                let mut replayed = 0u64;
                let generation = self.authorizer.generation();
                for d in ring.events.iter().skip(skip) {
                    if self.router.admits(stream.conn(), d) {
                        stream.push_replay(Frame {
                            delivery: d.clone(),
                            generation,
                        });
                        replayed += 1;
                    }
                }
                self.metrics.replayed_events.inc_by(replayed);
            }
        }
        let reg = self.router.add(stream.conn().clone());
        stream.hold(Box::new(reg));
    }
}
