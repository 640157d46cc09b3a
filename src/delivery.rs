//! An accepted event on its way to clients: numbered, and encoded at most
//! once per dialect for every stream that receives it.
//!
//! A [`Delivery`] is made by a bus (when it numbers an event, or reads one
//! back for a resume) and shared by the router, every stream's queue and the
//! writers. It never changes once made, but for its encodings, each made by
//! the first stream of its dialect that writes it.

use std::sync::OnceLock;
use std::time::Instant;

use crate::event::{Event, EventKey};
use crate::protocol::{Dialect, Encoded};

/// An accepted event, ready to fan out.
#[derive(Debug)]
pub struct Delivery {
    /// Sequence number, the SSE `id`.
    pub seq: u64,
    /// The event.
    pub event: Event,
    /// When herald accepted it.
    pub accepted_at: Instant,
    encoded: [OnceLock<Encoded>; Dialect::COUNT],
}

impl Delivery {
    /// Event `ev`, numbered `seq`.
    pub fn new(seq: u64, ev: Event) -> Delivery {
        Delivery {
            seq,
            event: ev,
            accepted_at: Instant::now(),
            encoded: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Where it happened.
    #[inline]
    pub fn key(&self) -> &EventKey {
        &self.event.key
    }

    /// The event in `dialect`, encoded the first time it is asked for.
    #[inline]
    pub fn encoded(&self, dialect: Dialect) -> &Encoded {
        self.encoded[dialect.index()]
            .get_or_init(|| Encoded::new(dialect.encode_event(self.seq, &self.event)))
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
        Arc::new(Delivery::new(seq, ev))
    }

    #[test]
    fn an_event_is_encoded_once_per_dialect() {
        let d = delivery(7, "p1", "/a");
        let first = d.encoded(Dialect::Native).frame().clone();
        assert!(std::str::from_utf8(&first)
            .unwrap()
            .starts_with("id: 7\nevent: secret:created\ndata: {"));
        // The same bytes, not a second encoding.
        assert_eq!(first.as_ptr(), d.encoded(Dialect::Native).frame().as_ptr());
    }
}
