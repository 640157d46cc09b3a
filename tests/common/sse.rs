//! The one SSE parser of the tests and benches: bytes in, messages out.
//!
//! Strict (the tests' default) fails the test on anything herald must never
//! write: a CR inside a line, a field it does not use, bytes that are not
//! UTF-8. Lenient (a browser's EventSource, the load benchmark) skips them.

/// One parsed SSE message (or a comment).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
    pub comment: bool,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }

    /// A message with neither an event name nor data: a comment or a bare `retry:`.
    pub fn is_meta(&self) -> bool {
        self.comment || (self.event.is_none() && self.data.is_empty())
    }
}

/// Splits a byte stream into SSE messages.
#[derive(Default)]
pub struct Parser {
    buf: Vec<u8>,
    lenient: bool,
}

impl Parser {
    pub fn strict() -> Self {
        Self::default()
    }

    pub fn lenient() -> Self {
        Self {
            buf: Vec::new(),
            lenient: true,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived.
    pub fn next(&mut self) -> Option<SseEvent> {
        let pos = self.buf.windows(2).position(|w| w == b"\n\n")?;
        let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
        let text = match String::from_utf8(block) {
            Ok(t) => t,
            Err(e) if self.lenient => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            Err(e) => panic!("SSE is UTF-8: {e}"),
        };
        let mut ev = SseEvent::default();
        let mut data = Vec::new();
        for line in text.lines() {
            if !self.lenient {
                assert!(!line.contains('\r'), "CR inside an SSE line: {line:?}");
            }
            if line.is_empty() {
                continue;
            }
            if line.starts_with(':') {
                ev.comment = true;
                continue;
            }
            let (k, v) = line.split_once(": ").unwrap_or((line, ""));
            match k {
                "id" => ev.id = Some(v.to_owned()),
                "event" => ev.event = Some(v.to_owned()),
                "data" => data.push(v.to_owned()),
                "retry" => ev.retry = v.parse().ok(),
                _ if self.lenient => {}
                other => panic!("unknown SSE field {other:?} in {text:?}"),
            }
        }
        ev.data = data.join("\n");
        Some(ev)
    }
}
