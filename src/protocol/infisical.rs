//! Infisical's dialect: a stream as Infisical's own server writes it, so
//! that its Kubernetes operator and its CLI proxy read herald unchanged
//! (`../shared/infisical.md` has what both clients parse).
//!
//! - An event: `id:` herald's sequence, `event:` the present-tense name
//!   (`secret:update`), `data:` `{"projectType":"secret-manager","data":
//!   {"eventType":…,"payload":…}}`: one `{environment, secretPath,
//!   secretKey}` item per key (an event without key names: one item without
//!   `secretKey`); `secret:import-mutation` carries one object. Both clients
//!   fail on a line of 64 KiB or more: an event whose `data:` line would
//!   reach [`MAX_DATA_LINE`] is written as several frames of the same `id`,
//!   each with some of the items.
//! - Heartbeat: `event: ping` (the operator counts nothing else).
//! - `error`, `gap`, `reconnect`: `{"message": …}`. Every named event but
//!   `ping` makes the operator re-fetch the resource; the CLI decodes the
//!   data into its payload struct, finds no event type it knows, and
//!   ignores it. No `retry:` line (neither client reads one).

use bytes::Bytes;
use serde_json::{json, Value};

use super::sse;
use super::{Close, Control};
use crate::event::Event;

/// `event: ping`, every heartbeat.
pub(super) const HEARTBEAT: &[u8] = b"event: ping\n\n";

/// The longest `data:` line written: well under the 64 KiB line both
/// clients' scanners refuse.
pub const MAX_DATA_LINE: usize = 60 * 1024;

fn body(event_type: &str, payload: Value) -> String {
    json!({
        "projectType": "secret-manager",
        "data": {"eventType": event_type, "payload": payload},
    })
    .to_string()
}

pub(super) fn event(seq: u64, event: &Event) -> Bytes {
    let name = event.key.event_type.api_name();
    let env = event.key.env.as_str();
    let path = event.key.path.as_str();
    let folder = || json!({"environment": env, "secretPath": path});
    let data = if name == "secret:import-mutation" {
        body(name, folder())
    } else {
        keyed_items(event, env, path)
            .map(|items| body(name, items))
            .filter(|d| d.len() <= MAX_DATA_LINE)
            .unwrap_or_else(|| body(name, json!([folder()])))
    };
    sse::message_bytes(None, Some(seq), name, Some(&data))
}

/// One item per distinct key, unless there is none or they cannot fit one
/// data line. Neither client needs the names (the CLI purges by environment
/// and path, the operator re-fetches), so the caller then sends one item
/// for the folder, and so when the encoded line is too long: the encoding
/// stays within a line whatever a publisher puts in `secretKeys`.
fn keyed_items(event: &Event, env: &str, path: &str) -> Option<Value> {
    let mut seen = std::collections::HashSet::new();
    let mut items = Vec::new();
    // What the items take at least (escaping only adds): stop building
    // them as soon as they cannot fit.
    let mut at_least = 0usize;
    for k in event.secret_keys.iter() {
        if seen.insert(&**k) {
            at_least += env.len() + path.len() + k.len() + 48;
            if at_least > MAX_DATA_LINE {
                return None;
            }
            items.push(json!({"environment": env, "secretPath": path, "secretKey": &**k}));
        }
    }
    (!items.is_empty()).then_some(Value::Array(items))
}

/// An `error` event alone (a stream refused by a limit, in this dialect).
pub fn error_frame(message: &str) -> Bytes {
    sse::message_bytes(
        None,
        None,
        "error",
        Some(&json!({"message": message}).to_string()),
    )
}

/// How many bytes the line that ends a stream holds: more than the 64 KiB
/// both clients' line scanners take, so that reading it is a read error.
pub const END_LINE: usize = 64 * 1024 + 64;

/// What ends every stream herald closes, after its closing event
/// ([`Dialect::end_line`](super::Dialect::end_line)): one
/// comment line longer than both clients' scanners take. The operator
/// treats a clean end (and a close without the chunk terminator) as
/// nothing and stays blind until its 2-minute watchdog; a read error makes
/// it reconnect after 1 s. The CLI reconnects after any end. A comment:
/// any other SSE reader skips it.
pub(super) fn end_line() -> &'static [u8] {
    static LINE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    LINE.get_or_init(|| {
        let mut l = b": herald closed this stream; reconnect".to_vec();
        l.resize(END_LINE, b' ');
        l.push(b'\n');
        l
    })
}

pub(super) fn control(control: &Control) -> Bytes {
    let (name, message) = match control {
        Control::Gap(reason) => ("gap", reason.message().to_owned()),
        Control::Close(Close::Reconnect { reason, .. }) => {
            ("reconnect", reason.message().to_owned())
        }
        Control::Close(close) => ("error", super::native::error_message(close)),
    };
    sse::message_bytes(
        None,
        None,
        name,
        Some(&json!({"message": message}).to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::super::{Dialect, GapReason};
    use super::*;

    fn ev(ty: &str, keys: Value) -> Event {
        let v = json!({
            "specversion": "1.0", "id": "e1", "source": "/t", "type": ty,
            "projectid": "p1", "environment": "prod", "secretpath": "/apps",
            "data": {"secretKeys": keys}
        });
        Event::from_json(v, 1 << 20).unwrap()
    }

    /// The CLI proxy's reading: `data:` lines only, trimmed and joined,
    /// one frame per blank line.
    fn cli_frames(b: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(b).unwrap();
        let mut out = Vec::new();
        let mut data = String::new();
        for line in text.split('\n') {
            if line.is_empty() {
                if !data.is_empty() {
                    out.push(serde_json::from_str(&std::mem::take(&mut data)).unwrap());
                }
            } else if let Some(d) = line.strip_prefix("data:") {
                assert!(line.len() < 64 * 1024, "a line both clients refuse");
                data.push_str(d.trim());
            }
        }
        out
    }

    #[test]
    fn events_read_as_infisical_writes_them() {
        let d = Dialect::Infisical;
        let b = d.encode_event(7, &ev("secret:updated", json!(["DB_PASSWORD", "DB_USER"])));
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            "id: 7\nevent: secret:update\ndata: {\"projectType\":\"secret-manager\",\"data\":{\"eventType\":\"secret:update\",\"payload\":[{\"environment\":\"prod\",\"secretPath\":\"/apps\",\"secretKey\":\"DB_PASSWORD\"},{\"environment\":\"prod\",\"secretPath\":\"/apps\",\"secretKey\":\"DB_USER\"}]}}\n\n"
        );
        let im = d.encode_event(8, &ev("secret:import-mutation", json!([])));
        assert_eq!(
            cli_frames(&im)[0]["data"],
            json!({"eventType": "secret:import-mutation", "payload": {"environment": "prod", "secretPath": "/apps"}})
        );
        let bare = d.encode_event(9, &ev("secret:deleted", json!([])));
        let f = cli_frames(&bare);
        assert_eq!(f[0]["data"]["eventType"], "secret:delete");
        assert_eq!(
            f[0]["data"]["payload"],
            json!([{"environment": "prod", "secretPath": "/apps"}])
        );
        assert!(std::str::from_utf8(&bare)
            .unwrap()
            .contains("event: secret:delete\n"));
        let created = d.encode_event(10, &ev("secret:created", json!(["A"])));
        assert!(std::str::from_utf8(&created)
            .unwrap()
            .contains("event: secret:create\n"));
        assert_eq!(d.heartbeat(), b"event: ping\n\n");
        assert!(d.opening(std::time::Duration::from_secs(3)).is_none());
    }

    #[test]
    fn a_large_event_stays_one_short_frame() {
        let keys: Vec<String> = (0..3000).map(|i| format!("KEY_NUMBER_{i:06}")).collect();
        let b = Dialect::Infisical.encode_event(11, &ev("secret:updated", json!(keys)));
        let frames = cli_frames(&b);
        assert_eq!(frames.len(), 1);
        assert_eq!(
            frames[0]["data"]["payload"],
            json!([{"environment": "prod", "secretPath": "/apps"}]),
            "too many names for a line: the folder"
        );
        // Many copies of one (empty) key cannot multiply the encoding.
        let dup =
            Dialect::Infisical.encode_event(12, &ev("secret:updated", json!(vec![""; 20_000])));
        assert!(dup.len() < 300, "{} bytes", dup.len());
        assert_eq!(
            cli_frames(&dup)[0]["data"]["payload"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let two =
            Dialect::Infisical.encode_event(13, &ev("secret:updated", json!(["A", "B", "A"])));
        assert_eq!(
            cli_frames(&two)[0]["data"]["payload"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn control_events_carry_a_message() {
        let d = Dialect::Infisical;
        let e = d.encode_control(&Control::Close(Close::TokenExpired), 3);
        let t = std::str::from_utf8(&e).unwrap();
        assert!(t.starts_with("event: error\ndata: {\"message\":"), "{t}");
        // Then the line both clients' scanners fail on (a prompt reconnect).
        let rest = std::str::from_utf8(d.end_line().unwrap()).unwrap();
        assert!(rest.starts_with(": herald closed this stream"));
        assert!(rest.ends_with('\n') && rest.len() > 64 * 1024 + 1);
        assert_eq!(rest.matches('\n').count(), 1, "one line");
        assert!(Dialect::Native.end_line().is_none());
        let g = d.encode_control(&Control::Gap(GapReason::Expired), 3);
        assert!(std::str::from_utf8(&g).unwrap().starts_with("event: gap\n"));
        // The operator stops retrying for good on this wording.
        for c in [
            Close::SlowConsumer,
            Close::TokenExpired,
            Close::TokenRevoked,
            Close::PermissionRevoked("x".into()),
        ] {
            let t = String::from_utf8(d.encode_control(&Control::Close(c), 0).to_vec()).unwrap();
            assert!(!(t.contains("plan") && t.contains("not available")), "{t}");
        }
    }
}
