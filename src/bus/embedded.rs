//! The embedded bus (the default, used when no NATS is configured): in
//! process, it numbers events, keeps the last N in a ring
//! buffer for `Last-Event-ID` resume, and dispatches to the router.
//!
//! Publishers take turns (events are numbered and dispatched in order); the
//! ring has a lock of its own, held only to add an event or copy a resume's
//! events, never while the router matches. A stream is registered with the
//! router before its resume reads the ring, and every event enters the ring
//! before it is dispatched, so a resuming stream sees every later event:
//! replayed, live, or both (the stream writes an id once).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::delivery::Delivery;
use crate::event::Event;
use crate::ident::ProjectId;
use crate::metrics::Metrics;
use crate::protocol::Control;
use crate::router::Router;
use crate::stream::{SseStream, StreamHandle};

use super::{first_sequence, Position, Published, Retained};

struct Ring {
    /// The newest sequence number issued.
    newest: u64,
    events: VecDeque<Arc<Delivery>>,
    capacity: usize,
}

/// The in-process bus.
pub struct EmbeddedBus {
    /// The sequence number the next event gets; held by a publisher for the
    /// whole publish, so events are dispatched in the order of their ids.
    next_seq: Mutex<u64>,
    ring: Mutex<Ring>,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    /// `herald_events_received_total{source="api"}`, resolved once.
    received: prometheus::IntCounter,
}

impl EmbeddedBus {
    /// A bus keeping the last `replay_capacity` events.
    pub fn new(router: Arc<Router>, metrics: Arc<Metrics>, replay_capacity: usize) -> Self {
        let start = first_sequence();
        Self {
            next_seq: Mutex::new(start),
            ring: Mutex::new(Ring {
                newest: start - 1,
                events: VecDeque::with_capacity(replay_capacity.min(65_536)),
                capacity: replay_capacity,
            }),
            router,
            received: metrics.events_received.with_label_values(&["api"]),
            metrics,
        }
    }

    pub(super) fn publish(&self, events: Vec<Event>) -> Vec<Published> {
        let mut out = Vec::with_capacity(events.len());
        let mut next_seq = self.next_seq.lock();
        for ev in events {
            let seq = *next_seq;
            *next_seq += 1;
            let id = ev.id.clone();
            let d = Arc::new(Delivery::new(seq, ev));
            self.received.inc();
            {
                let mut ring = self.ring.lock();
                ring.newest = seq;
                if ring.capacity > 0 {
                    if ring.events.len() == ring.capacity {
                        ring.events.pop_front();
                    }
                    ring.events.push_back(d.clone());
                }
            }
            self.router.dispatch(&d);
            out.push(Published {
                id,
                sequence: Some(seq),
                duplicate: false,
            });
        }
        out
    }

    /// The retained events of `project` after `after`.
    fn retained(&self, project: &ProjectId, after: u64) -> Retained {
        let ring = self.ring.lock();
        let newest = ring.newest;
        let oldest = ring.events.front().map_or(newest + 1, |d| d.seq);
        if after > newest {
            return Retained {
                position: Position::Unknown,
                events: Vec::new(),
                truncated: false,
                through: newest,
            };
        }
        // after <= newest < u64::MAX: no overflow.
        let skip = (after + 1).saturating_sub(oldest) as usize;
        Retained {
            position: if after + 1 < oldest {
                Position::Expired
            } else {
                Position::Known
            },
            events: ring
                .events
                .iter()
                .skip(skip)
                .filter(|d| d.key().project == *project)
                .cloned()
                .collect(),
            truncated: false,
            through: newest,
        }
    }

    pub(super) fn resume_held(
        &self,
        handle: &Arc<StreamHandle>,
        generation: u64,
        after: u64,
        open: Option<Control>,
    ) {
        let retained = self.retained(&handle.project, after);
        let plan = super::plan_resume(
            handle,
            generation,
            after,
            retained,
            &self.router,
            &self.metrics,
        );
        handle.resume_with(plan.held(true, open));
    }

    pub(super) fn attach(&self, stream: &mut SseStream, resume_from: Option<u64>) {
        if resume_from.is_none() && stream.starts_at_head() {
            // Read before the stream is registered: it has every event after it.
            let newest = self.ring.lock().newest;
            stream.start_after(newest);
        }
        // Registered first: what enters the ring after the copy below is
        // dispatched to this stream.
        let reg = self.router.add(stream.handle().clone());
        stream.hold(Box::new(reg));
        if let Some(after) = resume_from {
            let retained = self.retained(&stream.handle().project, after);
            super::resume(stream, after, retained, &self.router, &self.metrics);
        }
    }
}
