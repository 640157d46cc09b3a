//! Server-Sent Events framing.
//!
//! Frames are built once into [`Bytes`] and shared by every connection that
//! receives them. `id:` and `event:` values are passed through [`line_safe`],
//! so no CR or LF can ever end a field early; `data:` carries JSON, which
//! serde_json always writes on one line.

use bytes::{BufMut, Bytes, BytesMut};

/// The comment sent on idle streams to keep proxies and clients from timing out.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// [`HEARTBEAT`] as an HTTP/1.1 chunk.
pub const HEARTBEAT_CHUNK: &[u8] = b"3\r\n:\n\n\r\n";

/// `frame` as one HTTP/1.1 chunk (size line, the bytes, CRLF), and the frame
/// alone as a view of the same bytes: an event is encoded once for both
/// kinds of connection.
pub fn chunk(frame: &[u8]) -> (Bytes, Bytes) {
    let mut buf = BytesMut::with_capacity(frame.len() + 20);
    buf.put_slice(format!("{:x}\r\n", frame.len()).as_bytes());
    let start = buf.len();
    buf.put_slice(frame);
    buf.put_slice(b"\r\n");
    let chunk = buf.freeze();
    let body = chunk.slice(start..start + frame.len());
    (chunk, body)
}

/// Drops CR and LF, the only bytes that could split an SSE field.
pub fn line_safe(s: &str) -> impl Iterator<Item = &str> {
    s.split(['\r', '\n'])
}

fn put_field(buf: &mut BytesMut, name: &str, value: &str) {
    buf.put_slice(name.as_bytes());
    buf.put_slice(b": ");
    for part in line_safe(value) {
        buf.put_slice(part.as_bytes());
    }
    buf.put_u8(b'\n');
}

/// An event frame: `id`, `event`, one `data` line, blank line.
pub fn event_frame(id: u64, event: &str, json: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(json.len() + event.len() + 40);
    let itoa = itoa_buf(id);
    put_field(&mut buf, "id", itoa.as_str());
    put_field(&mut buf, "event", event);
    put_data(&mut buf, json);
    buf.put_u8(b'\n');
    buf.freeze()
}

fn put_data(buf: &mut BytesMut, data: &str) {
    // JSON from serde_json has no raw newlines; split anyway so a bug elsewhere
    // can only produce more data lines, never a forged field.
    for line in data.split('\n') {
        buf.put_slice(b"data: ");
        buf.put_slice(line.trim_end_matches('\r').as_bytes());
        buf.put_u8(b'\n');
    }
}

/// A `retry:` hint in milliseconds.
pub fn retry_frame(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

/// The kinds of control events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// The stream ends with an error (`permission_revoked`, `token_expired`, `slow_consumer`).
    Error,
    /// The instance is draining: come back with `Last-Event-ID`.
    Reconnect,
    /// Events may have been missed and cannot be replayed: resync.
    Gap,
}

impl Control {
    fn name(self) -> &'static str {
        match self {
            Control::Error => "error",
            Control::Reconnect => "reconnect",
            Control::Gap => "gap",
        }
    }
}

/// A control event with a JSON payload, and an optional `retry:` before it.
pub fn control_frame(kind: Control, payload: &serde_json::Value, retry_ms: Option<u64>) -> Bytes {
    let json = payload.to_string();
    let mut buf = BytesMut::with_capacity(json.len() + 48);
    if let Some(ms) = retry_ms {
        buf.put_slice(format!("retry: {ms}\n").as_bytes());
    }
    put_field(&mut buf, "event", kind.name());
    put_data(&mut buf, &json);
    buf.put_u8(b'\n');
    buf.freeze()
}

/// A small stack buffer for formatting a u64 without allocating.
struct ItoaBuf {
    buf: [u8; 20],
    start: usize,
}

impl ItoaBuf {
    fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or("0")
    }
}

fn itoa_buf(mut n: u64) -> ItoaBuf {
    let mut b = ItoaBuf {
        buf: [0; 20],
        start: 20,
    };
    loop {
        b.start -= 1;
        b.buf[b.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_frame_layout() {
        let f = event_frame(42, "secret:created", r#"{"a":1}"#);
        assert_eq!(
            &f[..],
            b"id: 42\nevent: secret:created\ndata: {\"a\":1}\n\n"
        );
        assert_eq!(&event_frame(0, "x", "{}")[..4], b"id: ");
        assert!(std::str::from_utf8(&event_frame(u64::MAX, "x", "{}"))
            .unwrap()
            .contains("18446744073709551615"));
    }

    #[test]
    fn cr_lf_cannot_forge_fields() {
        let f = event_frame(1, "evil\r\nid: 999\nevent: x", "{\"a\":\n1}");
        let text = std::str::from_utf8(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "id: 1");
        assert_eq!(lines[1], "event: evilid: 999event: x");
        assert!(lines[2..]
            .iter()
            .take_while(|l| !l.is_empty())
            .all(|l| l.starts_with("data: ")));
    }

    #[test]
    fn control_frames() {
        let f = control_frame(
            Control::Reconnect,
            &serde_json::json!({"reason": "draining"}),
            Some(1500),
        );
        assert_eq!(
            &f[..],
            b"retry: 1500\nevent: reconnect\ndata: {\"reason\":\"draining\"}\n\n"
        );
        assert_eq!(&retry_frame(3000)[..], b"retry: 3000\n\n");
    }

    #[test]
    fn chunks_wrap_frames() {
        let (chunk, body) = chunk(&[b'x'; 26]);
        assert_eq!(&chunk[..4], b"1a\r\n");
        assert_eq!(&chunk[4..30], &[b'x'; 26]);
        assert_eq!(&chunk[30..], b"\r\n");
        assert_eq!(&body[..], &[b'x'; 26]);
        assert_eq!(super::chunk(HEARTBEAT).0, HEARTBEAT_CHUNK);
    }
}
