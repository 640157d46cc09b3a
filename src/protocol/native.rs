//! herald's own dialect (DESIGN.md section 4).
//!
//! - An event: `id:` the sequence, `event:` the canonical type
//!   (`secret:created`), `data:` the CloudEvent JSON on one line.
//! - `gap`: `{"reason", "lastEventId", "message"}`; the stream goes on.
//! - `error`: `{"code", "message"}` (and `registration` for
//!   `permission_revoked`); the stream closes.
//! - `reconnect`: a jittered `retry:` line, then `{"reason", "message"}`; the
//!   stream closes.
//! - Heartbeat: a `:` comment. First on every stream: `retry:`.
//!
//! Control events carry no `id:`, so a client's last event id stays put.

use bytes::Bytes;
use serde_json::json;

use super::sse;
use super::{Close, Control};
use crate::event::Event;

/// A comment line: ignored by every SSE parser, enough for any proxy.
pub(super) const HEARTBEAT: &[u8] = b":\n\n";

pub(super) fn event(seq: u64, event: &Event) -> Bytes {
    sse::message_bytes(
        None,
        Some(seq),
        event.key.event_type.name(),
        Some(&event.json),
    )
}

pub(super) fn control(control: &Control, last_written: u64) -> Bytes {
    let (retry, name, body) = match control {
        Control::Gap(reason) => {
            let mut body = json!({"reason": reason.label(), "message": reason.message()});
            if last_written > 0 {
                // A string, like the `id:` values it names.
                body["lastEventId"] = last_written.to_string().into();
            }
            (None, "gap", body)
        }
        Control::Close(Close::Reconnect { reason, retry_ms }) => (
            Some(*retry_ms),
            "reconnect",
            json!({"reason": reason.label(), "message": reason.message()}),
        ),
        Control::Close(close) => {
            let mut body = json!({"code": close.label(), "message": error_message(close)});
            if let Close::PermissionRevoked(registration) = close {
                body["registration"] = registration.as_str().into();
            }
            (None, "error", body)
        }
    };
    sse::message_bytes(retry, None, name, Some(&body.to_string()))
}

pub(super) fn error_message(close: &Close) -> String {
    match close {
        Close::SlowConsumer => {
            "the client did not keep up; reconnect with Last-Event-ID".to_owned()
        }
        Close::PermissionRevoked(registration) => {
            format!("the policy no longer allows {registration}")
        }
        Close::TokenExpired => "the token has expired; reconnect with a fresh token".to_owned(),
        Close::TokenRevoked => {
            "the token's provider no longer confirms it; authenticate again".to_owned()
        }
        Close::Reconnect { reason, .. } => reason.message().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Dialect, GapReason, ReconnectReason};
    use super::*;

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn control_events_read_as_documented() {
        let d = Dialect::Native;
        let gap = d.encode_control(&Control::Gap(GapReason::Expired), 42);
        assert_eq!(
            text(&gap),
            "event: gap\ndata: {\"reason\":\"expired\",\"message\":\"events after this id are no longer retained; resync\",\"lastEventId\":\"42\"}\n\n"
        );
        let fresh = d.encode_control(&Control::Gap(GapReason::BusReconnected), 0);
        assert!(!text(&fresh).contains("lastEventId"));
        let reconnect = d.encode_control(
            &Control::Close(Close::Reconnect {
                reason: ReconnectReason::Draining,
                retry_ms: 1500,
            }),
            7,
        );
        assert!(text(&reconnect)
            .starts_with("retry: 1500\nevent: reconnect\ndata: {\"reason\":\"draining\""));
        let revoked = d.encode_control(
            &Control::Close(Close::PermissionRevoked("register[0]: x".into())),
            7,
        );
        let v: serde_json::Value = serde_json::from_str(
            text(&revoked)
                .lines()
                .nth(1)
                .unwrap()
                .strip_prefix("data: ")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(v["code"], "permission_revoked");
        assert_eq!(v["registration"], "register[0]: x");
        assert_eq!(d.heartbeat(), b":\n\n");
        assert_eq!(
            &d.opening(std::time::Duration::from_secs(3)).unwrap()[..],
            b"retry: 3000\n\n"
        );
    }
}
