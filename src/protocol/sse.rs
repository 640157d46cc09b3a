//! Server-Sent Events fields, written once into shared [`Bytes`].
//!
//! `id:` and `event:` values pass through [`line_safe`], so no CR or LF can
//! ever end a field early; `data:` is split at line ends into several
//! `data:` lines, so a stray newline can only add data, never forge a field.
//! Only the dialects call this; they decide what the fields say.

use bytes::{BufMut, Bytes, BytesMut};

/// Drops CR and LF, the only bytes that could split an SSE field.
pub(super) fn line_safe(s: &str) -> impl Iterator<Item = &str> {
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

fn put_data(buf: &mut BytesMut, data: &str) {
    // JSON from serde_json has no raw newlines; split anyway so a bug elsewhere
    // can only produce more data lines, never a forged field.
    for line in data.split('\n') {
        buf.put_slice(b"data: ");
        buf.put_slice(line.trim_end_matches('\r').as_bytes());
        buf.put_u8(b'\n');
    }
}

/// One SSE message: an optional `retry:`, an optional `id:`, an `event:`
/// name, an optional `data:` body, and the blank line that ends it.
pub(super) fn message(
    buf: &mut BytesMut,
    retry_ms: Option<u64>,
    id: Option<u64>,
    event: &str,
    data: Option<&str>,
) {
    if let Some(ms) = retry_ms {
        put_field(buf, "retry", itoa(ms).as_str());
    }
    if let Some(id) = id {
        put_field(buf, "id", itoa(id).as_str());
    }
    put_field(buf, "event", event);
    if let Some(d) = data {
        put_data(buf, d);
    }
    buf.put_u8(b'\n');
}

/// A message alone in its own buffer.
pub(super) fn message_bytes(
    retry_ms: Option<u64>,
    id: Option<u64>,
    event: &str,
    data: Option<&str>,
) -> Bytes {
    let mut buf = BytesMut::with_capacity(data.map_or(0, str::len) + event.len() + 48);
    message(&mut buf, retry_ms, id, event, data);
    buf.freeze()
}

/// A `retry:` hint alone.
pub(super) fn retry(ms: u64) -> Bytes {
    let mut buf = BytesMut::with_capacity(32);
    put_field(&mut buf, "retry", itoa(ms).as_str());
    buf.put_u8(b'\n');
    buf.freeze()
}

/// A small stack buffer for formatting a u64 without allocating.
pub(super) struct ItoaBuf {
    buf: [u8; 20],
    start: usize,
}

impl ItoaBuf {
    pub(super) fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or("0")
    }
}

pub(super) fn itoa(mut n: u64) -> ItoaBuf {
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
    fn message_layout() {
        let f = message_bytes(None, Some(42), "secret:created", Some(r#"{"a":1}"#));
        assert_eq!(
            &f[..],
            b"id: 42\nevent: secret:created\ndata: {\"a\":1}\n\n"
        );
        let f = message_bytes(Some(1500), None, "reconnect", Some("{}"));
        assert_eq!(&f[..], b"retry: 1500\nevent: reconnect\ndata: {}\n\n");
        assert_eq!(
            &message_bytes(None, None, "ping", None)[..],
            b"event: ping\n\n"
        );
        assert_eq!(&retry(3000)[..], b"retry: 3000\n\n");
        assert!(
            std::str::from_utf8(&message_bytes(None, Some(u64::MAX), "x", None))
                .unwrap()
                .contains("18446744073709551615")
        );
    }

    #[test]
    fn cr_lf_cannot_forge_fields() {
        let f = message_bytes(
            None,
            Some(1),
            "evil\r\nid: 999\nevent: x",
            Some("{\"a\":\n1}"),
        );
        let text = std::str::from_utf8(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "id: 1");
        assert_eq!(lines[1], "event: evilid: 999event: x");
        assert!(lines[2..]
            .iter()
            .take_while(|l| !l.is_empty())
            .all(|l| l.starts_with("data: ")));
    }
}
