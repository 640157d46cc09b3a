//! An accepted event on its way to clients: numbered, and encoded once for
//! every stream that receives it.
//!
//! A [`Delivery`] is made by a bus (when it numbers an event, or reads one
//! back for a resume) and shared by the router, every stream's queue and the
//! writers. It never changes once made.

use std::time::Instant;

use bytes::Bytes;

use crate::event::{Event, EventKey};

/// An accepted event, encoded once, ready to fan out.
#[derive(Debug)]
pub struct Delivery {
    /// Sequence number, the SSE `id`.
    pub seq: u64,
    /// Where it happened.
    pub key: EventKey,
    /// The encoded SSE frame, shared by every receiver.
    pub frame: Bytes,
    /// The same frame as an HTTP/1.1 chunk (`frame` is a view of it).
    pub chunk: Bytes,
    /// When herald accepted it.
    pub accepted_at: Instant,
}

impl Delivery {
    /// Encodes `ev` as the SSE frame with id `seq`, once for every receiver.
    pub fn encode(seq: u64, ev: Event) -> Delivery {
        let (chunk, frame) = crate::sse::chunk(&crate::sse::event_frame(
            seq,
            ev.key.event_type.name(),
            &ev.json,
        ));
        Delivery {
            seq,
            frame,
            chunk,
            key: ev.key,
            accepted_at: Instant::now(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;

    /// A `secret:created` event of `project` at `path` in `prod`, numbered `seq`.
    pub(crate) fn delivery(seq: u64, project: &str, path: &str) -> Arc<Delivery> {
        let json = serde_json::json!({
            "specversion": "1.0", "source": "/test", "type": "secret:created",
            "projectid": project, "environment": "prod", "secretpath": path,
        });
        let ev = Event::from_json(json, 65536).expect("a valid test event");
        Arc::new(Delivery::encode(seq, ev))
    }
}
