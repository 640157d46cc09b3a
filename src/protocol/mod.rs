//! The stream protocol: every byte a client sees on an event stream.
//!
//! A stream speaks one [`Dialect`], chosen when it is opened. The dialect
//! decides how an event reads (its `event:` name and `data:` body), how the
//! control events read ([`Control`]: `gap`, `reconnect`, `error`), what a
//! heartbeat is, and what comes first on a new stream. Routing, policy,
//! replay and limits are the same for every dialect and never build a byte
//! of this: they hand over an event (a `Delivery`) or a [`Control`].
//!
//! An event is encoded at most once per dialect ([`Encoded`]), on the first
//! stream of that dialect that writes it, and the bytes are shared by every
//! other. HTTP framing is not here: the HTTP/1.1 chunks are the direct
//! writer's (`http::direct`), which keeps its form of an event in the
//! [`Encoded`] it got from here.

pub mod infisical;
mod native;
mod sse;

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;

use crate::event::Event;

/// A wire dialect: the way one stream writes events and control events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// herald's own (DESIGN.md section 4): CloudEvents, `gap` / `reconnect`
    /// / `error`, comment heartbeats, a `retry:` hint first.
    Native,
    /// Infisical's (`protocol::infisical`): its event names and payload,
    /// `event: ping` heartbeats, no `retry:`.
    Infisical,
}

impl Dialect {
    /// How many dialects there are (the size of a delivery's encoding cache).
    pub const COUNT: usize = 2;

    /// Every dialect, in index order.
    pub const ALL: [Dialect; Dialect::COUNT] = [Dialect::Native, Dialect::Infisical];

    /// The dialect's index in a delivery's encoding cache.
    pub(crate) fn index(self) -> usize {
        match self {
            Dialect::Native => 0,
            Dialect::Infisical => 1,
        }
    }

    /// The dialect's name in config and admin views.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Native => "native",
            Dialect::Infisical => "infisical",
        }
    }

    /// Event `seq` as this dialect writes it.
    pub fn encode_event(self, seq: u64, event: &Event) -> Bytes {
        match self {
            Dialect::Native => native::event(seq, event),
            Dialect::Infisical => infisical::event(seq, event),
        }
    }

    /// A control event as this dialect writes it; `last_written` is the id of
    /// the last event the stream wrote (0 for none).
    pub fn encode_control(self, control: &Control, last_written: u64) -> Bytes {
        match self {
            Dialect::Native => native::control(control, last_written),
            Dialect::Infisical => infisical::control(control),
        }
    }

    /// What an idle stream is sent to keep proxies and clients from timing out.
    pub fn heartbeat(self) -> &'static [u8] {
        match self {
            Dialect::Native => native::HEARTBEAT,
            Dialect::Infisical => infisical::HEARTBEAT,
        }
    }

    /// Whether clients of this dialect count only its heartbeat as a sign
    /// of life (so it is due even while events flow).
    pub fn heartbeat_is_liveness(self) -> bool {
        matches!(self, Dialect::Infisical)
    }

    /// What a stream herald ends writes after its closing event, if
    /// anything (`infisical::END_LINE`: the line that makes the operator
    /// reconnect at once).
    pub fn end_line(self) -> Option<&'static [u8]> {
        match self {
            Dialect::Native => None,
            Dialect::Infisical => Some(infisical::end_line()),
        }
    }

    /// What a new stream starts with, before any event (`retry` is the
    /// configured reconnection hint).
    pub fn opening(self, retry: Duration) -> Option<Bytes> {
        match self {
            Dialect::Native => Some(sse::retry(millis(retry))),
            Dialect::Infisical => None,
        }
    }
}

/// An event encoded in one dialect, shared by every stream of that dialect;
/// `wire` holds the form a writer puts on the socket, when it is not the
/// frame itself (the direct writer's HTTP/1.1 chunk), made once as well.
#[derive(Debug)]
pub struct Encoded {
    frame: Bytes,
    wire: OnceLock<Bytes>,
}

impl Encoded {
    pub(crate) fn new(frame: Bytes) -> Self {
        Self {
            frame,
            wire: OnceLock::new(),
        }
    }

    /// The SSE bytes.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// The writer's form of the frame, made by `make` the first time.
    pub fn wire(&self, make: impl FnOnce(&[u8]) -> Bytes) -> &Bytes {
        self.wire.get_or_init(|| make(&self.frame))
    }
}

/// What herald tells a client about the stream itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Events may have been missed and cannot be replayed: resync. The stream
    /// goes on.
    Gap(GapReason),
    /// The stream ends (the last thing written on it).
    Close(Close),
}

/// Why a client is told it may have missed events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The resume id was never issued (ahead of anything retained, or not a number).
    UnknownId,
    /// Events after the resume id are no longer retained.
    Expired,
    /// More events were missed than one resume replays.
    TooFarBehind,
    /// The bus was unreachable when the stream opened.
    BusUnavailable,
    /// The deployment keeps no replay, so a resume cannot be served.
    ReplayUnavailable,
    /// The bus reconnected; events of the outage are lost.
    BusReconnected,
    /// The bus dropped messages (a NATS slow consumer).
    BusOverflow,
    /// The client, which sends no `Last-Event-ID`, was away longer than
    /// herald remembers where it left off (`remember.window`).
    WindowPassed,
    /// An ingest source that keeps nothing while herald is not listening
    /// (Infisical's Redis bus) was unreachable.
    SourceUnavailable,
}

impl GapReason {
    /// The reason on the wire and in metrics.
    pub fn label(self) -> &'static str {
        match self {
            GapReason::UnknownId => "unknown_id",
            GapReason::Expired => "expired",
            GapReason::TooFarBehind => "too_far_behind",
            GapReason::BusUnavailable => "bus_unavailable",
            GapReason::ReplayUnavailable => "replay_unavailable",
            GapReason::BusReconnected => "bus_reconnected",
            GapReason::BusOverflow => "bus_overflow",
            GapReason::WindowPassed => "window_passed",
            GapReason::SourceUnavailable => "source_unavailable",
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            GapReason::UnknownId => "this id was never issued here; resync",
            GapReason::Expired => "events after this id are no longer retained; resync",
            GapReason::TooFarBehind => "more events were missed than one resume replays; resync",
            GapReason::BusUnavailable => {
                "the event bus is reconnecting; events may be missed: resync"
            }
            GapReason::ReplayUnavailable => {
                "this deployment keeps no replay; events after your last id may have been missed: resync"
            }
            GapReason::BusReconnected | GapReason::BusOverflow => {
                "events may have been missed; resync"
            }
            GapReason::WindowPassed => {
                "this client was away longer than herald remembers where it left off; resync"
            }
            GapReason::SourceUnavailable => {
                "herald could not hear its event source for a while; events may have been missed: resync"
            }
        }
    }
}

/// Why a stream ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Close {
    /// The client did not keep up; its queue overflowed.
    SlowConsumer,
    /// The policy no longer allows one of its registrations (named).
    PermissionRevoked(String),
    /// Its token expired.
    TokenExpired,
    /// Its token's provider no longer confirms it (introspection).
    TokenRevoked,
    /// Come back after `retry_ms`, with `Last-Event-ID`.
    Reconnect {
        /// Why.
        reason: ReconnectReason,
        /// The `retry:` hint, jittered per stream ([`jittered_retry_ms`]).
        retry_ms: u64,
    },
}

impl Close {
    /// Metric label (`herald_streams_closed_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            Close::SlowConsumer => "slow_consumer",
            Close::PermissionRevoked(_) => "permission_revoked",
            Close::TokenExpired => "token_expired",
            Close::TokenRevoked => "token_revoked",
            Close::Reconnect { .. } => "reconnect",
        }
    }

    /// Whether frames already queued are still written before the closing event.
    pub fn flushes_queue(&self) -> bool {
        matches!(self, Close::Reconnect { .. })
    }
}

/// Why a stream is told to reconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconnectReason {
    /// This instance is shutting down.
    Draining,
    /// This instance cannot reach its event bus.
    BusUnavailable,
    /// This instance's bus link came back; the replay stream has what was missed.
    BusReconnected,
    /// The bus dropped messages; the replay stream has them.
    BusOverflow,
    /// The stream reached `stream.max_lifetime` (so that streams spread over
    /// instances added since they opened).
    MaxLifetime,
}

impl ReconnectReason {
    /// The reason on the wire.
    pub fn label(self) -> &'static str {
        match self {
            ReconnectReason::Draining => "draining",
            ReconnectReason::BusUnavailable => "bus_unavailable",
            ReconnectReason::BusReconnected => "bus_reconnected",
            ReconnectReason::BusOverflow => "bus_overflow",
            ReconnectReason::MaxLifetime => "max_lifetime",
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            ReconnectReason::Draining => {
                "this instance is shutting down; reconnect with Last-Event-ID"
            }
            ReconnectReason::MaxLifetime => {
                "this stream reached its lifetime; reconnect with Last-Event-ID"
            }
            ReconnectReason::BusUnavailable => {
                "this instance cannot serve the stream now; reconnect with Last-Event-ID"
            }
            ReconnectReason::BusReconnected | ReconnectReason::BusOverflow => {
                "events may have been missed here; reconnect with Last-Event-ID to resume"
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A `retry:` hint for a stream told to reconnect: between half and one and
/// a half times `base`, so that clients told at once do not come back at once.
pub fn jittered_retry_ms(base: Duration) -> u64 {
    let base = millis(base).max(2);
    rand::thread_rng().gen_range(base / 2..=base.saturating_add(base / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_either_side() {
        for _ in 0..1000 {
            let ms = jittered_retry_ms(Duration::from_secs(3));
            assert!((1500..=4500).contains(&ms), "{ms}");
        }
        assert!(jittered_retry_ms(Duration::ZERO) <= 3);
        // No setting can overflow it.
        let _ = jittered_retry_ms(Duration::MAX);
    }
}
