//! HTTP/1 event streams on the wire: what a raw client sees from the direct
//! stream writer (framing, headers, the end of the connection), and the
//! requests it hands on to hyper.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOUR: Duration = Duration::from_secs(3600);
const SUBSCRIBE: &str = "/api/v1/events/subscribe/project-events";

fn all_created(project: &str) -> Value {
    serde_json::json!({"projectId": project, "register": [{"event": "secret:created"}]})
}

fn subscribe_request(version: &str, token: &str, body: &str) -> String {
    declared_subscribe(version, token, body.len(), body)
}

/// A subscribe request whose `Content-Length` says `declared`, whatever is sent.
fn declared_subscribe(version: &str, token: &str, declared: usize, body: &str) -> String {
    format!(
        "POST {SUBSCRIBE} {version}\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n{body}"
    )
}

/// What arrived on a raw connection so far.
struct Raw {
    s: TcpStream,
    bytes: Vec<u8>,
    closed: bool,
}

impl Raw {
    async fn connect(h: &Herald) -> Raw {
        Raw {
            s: TcpStream::connect(h.public).await.unwrap(),
            bytes: Vec::new(),
            closed: false,
        }
    }

    async fn send(&mut self, data: &[u8]) {
        self.s.write_all(data).await.unwrap();
    }

    /// Reads until `needle` has arrived (true) or the connection ended (false).
    async fn until(&mut self, needle: &str) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut buf = [0u8; 16 * 1024];
        loop {
            if String::from_utf8_lossy(&self.bytes).contains(needle) {
                return true;
            }
            if self.closed {
                return false;
            }
            match tokio::time::timeout_at(deadline, self.s.read(&mut buf)).await {
                Err(_) => panic!("{needle:?} did not arrive; got {:?}", self.text()),
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self.bytes.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Reads until the server closes the connection.
    async fn until_closed(&mut self) {
        self.until("\u{0}never\u{0}").await;
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The response head (lower-cased) and the raw body after it.
    fn split(&self) -> (String, Vec<u8>) {
        let at = self
            .bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete head");
        (
            String::from_utf8_lossy(&self.bytes[..at]).to_ascii_lowercase(),
            self.bytes[at + 4..].to_vec(),
        )
    }
}

/// Decodes a chunked body; `complete` says whether the last chunk arrived.
fn dechunk(mut body: &[u8]) -> (String, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return (String::from_utf8_lossy(&out).into_owned(), false);
        };
        let size = usize::from_str_radix(std::str::from_utf8(&body[..eol]).unwrap(), 16)
            .expect("a hex chunk size");
        body = &body[eol + 2..];
        if size == 0 {
            assert_eq!(body, b"\r\n", "nothing after the last chunk");
            return (String::from_utf8_lossy(&out).into_owned(), true);
        }
        assert!(body.len() >= size + 2, "a whole chunk");
        out.extend_from_slice(&body[..size]);
        assert_eq!(&body[size..size + 2], b"\r\n", "a chunk ends with CRLF");
        body = &body[size + 2..];
    }
}

#[tokio::test]
async fn an_http11_stream_is_chunked_and_ends_its_connection() {
    let h = HeraldBuilder::new().env("STREAM__HEARTBEAT", "1h").start();
    let t = token_for("reader", Duration::from_secs(3));
    let mut c = Raw::connect(&h).await;
    c.send(subscribe_request("HTTP/1.1", &t, &all_created("p1").to_string()).as_bytes())
        .await;
    assert!(c.until("retry:").await);
    h.publish(
        &token_for("writer", HOUR),
        &event("secret:created", "p1", "prod", "/wire/a"),
    )
    .await;
    assert!(c.until("/wire/a").await);
    // The token expires after 3 s: the stream ends with its error event, the
    // last chunk, and the connection.
    assert!(c.until("token_expired").await);
    c.until_closed().await;
    let (head, body) = c.split();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    for line in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "transfer-encoding: chunked",
        "connection: close",
        "date: ",
    ] {
        assert!(head.contains(line), "{line:?} missing from {head}");
    }
    assert!(!head.contains("content-length"), "{head}");
    let (events, complete) = dechunk(&body);
    assert!(complete, "the body ends with the last chunk: {events:?}");
    let names: Vec<&str> = events
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names, ["secret:created", "error"], "{events}");
    assert!(events.starts_with("retry: "), "{events}");
    h.wait_metric("herald_connections", 0.0).await;
}

#[tokio::test]
async fn an_http10_stream_ends_with_its_connection() {
    let h = HeraldBuilder::new().start();
    let t = token_for("reader", Duration::from_secs(2));
    let mut c = Raw::connect(&h).await;
    c.send(subscribe_request("HTTP/1.0", &t, &all_created("p1").to_string()).as_bytes())
        .await;
    assert!(c.until("retry:").await);
    assert!(c.until("token_expired").await);
    c.until_closed().await;
    let (head, body) = c.split();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    let body = String::from_utf8(body).unwrap();
    assert!(body.starts_with("retry: "), "{body}");
    assert!(
        body.ends_with("\n\n"),
        "the body is the events alone: {body:?}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_stream() {
    let h = HeraldBuilder::new().env("STREAM__HEARTBEAT", "1h").start();
    let t = token_for("reader", HOUR);
    let mut gone = Raw::connect(&h).await;
    gone.send(subscribe_request("HTTP/1.1", &t, &all_created("p1").to_string()).as_bytes())
        .await;
    assert!(gone.until("retry:").await);
    let mut chatty = Raw::connect(&h).await;
    chatty
        .send(subscribe_request("HTTP/1.1", &t, &all_created("p1").to_string()).as_bytes())
        .await;
    assert!(chatty.until("retry:").await);
    h.wait_metric("herald_connections", 2.0).await;
    // Closing the socket is noticed without any write to it.
    drop(gone);
    h.wait_metric("herald_connections", 1.0).await;
    // A client that keeps sending on a stream is cut off.
    let junk = vec![b'x'; 128 * 1024];
    let _ = chatty.s.write_all(&junk).await;
    chatty.until_closed().await;
    h.wait_metric("herald_connections", 0.0).await;
}

#[tokio::test]
async fn a_stream_after_another_request_on_one_connection_is_served() {
    let h = HeraldBuilder::new().start();
    let w = token_for("writer", HOUR);
    let t = token_for("reader", HOUR);
    let mut c = Raw::connect(&h).await;
    // First a publish (served by hyper), then a subscribe on the same
    // keep-alive connection.
    let ev = event("secret:created", "p1", "prod", "/wire/first").to_string();
    c.send(
        format!(
            "POST /api/v1/events/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {w}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ev}",
            ev.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(c.until("\"sequence\"").await, "{}", c.text());
    assert!(c.text().starts_with("HTTP/1.1 20"), "{}", c.text());
    c.send(subscribe_request("HTTP/1.1", &t, &all_created("p1").to_string()).as_bytes())
        .await;
    assert!(c.until("retry:").await);
    h.publish(&w, &event("secret:created", "p1", "prod", "/wire/second"))
        .await;
    assert!(c.until("/wire/second").await);
}

#[tokio::test]
async fn stream_request_bodies_are_bounded_in_size_and_time() {
    let h = HeraldBuilder::new()
        .env("SERVER__BODY_READ_TIMEOUT", "300ms")
        .start();
    let t = token_for("reader", HOUR);
    // Declared too large: refused without reading it.
    let mut big = Raw::connect(&h).await;
    big.send(declared_subscribe("HTTP/1.1", &t, 999_999_999, "{").as_bytes())
        .await;
    big.until_closed().await;
    assert!(big.text().starts_with("HTTP/1.1 413 "), "{}", big.text());
    assert!(
        big.text().contains("\"code\":\"body_too_large\""),
        "{}",
        big.text()
    );
    // Declared, never sent in full: 408.
    let mut slow = Raw::connect(&h).await;
    slow.send(declared_subscribe("HTTP/1.1", &t, 100, "{\"projectId\"").as_bytes())
        .await;
    slow.until_closed().await;
    assert!(slow.text().starts_with("HTTP/1.1 408 "), "{}", slow.text());
    assert!(slow.text().contains("body_timeout"), "{}", slow.text());
    // Refused requests are answered whole, then the connection ends.
    let mut bad = Raw::connect(&h).await;
    bad.send(subscribe_request("HTTP/1.1", "not-a-token", "{}").as_bytes())
        .await;
    bad.until_closed().await;
    let (head, body) = bad.split();
    assert!(head.starts_with("http/1.1 401 "), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .parse()
        .unwrap();
    assert_eq!(len, body.len());
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "unauthorized", "{v}");
}

/// The status codes of the responses on a connection, in order, read until
/// `want` of them arrived or the server closed it.
async fn statuses(s: &mut TcpStream, want: usize) -> Vec<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut bytes: Vec<u8> = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut closed = false;
    loop {
        // Parse what arrived: status line, head, a body of Content-Length.
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(end) = bytes[at..].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[at..at + end]).to_ascii_lowercase();
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .expect("a status line");
            out.push(code);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            at += end + 4 + len;
            if at > bytes.len() || head.contains("text/event-stream") {
                break;
            }
        }
        if out.len() >= want || closed {
            return out;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("no answer; got {:?}", String::from_utf8_lossy(&bytes)),
            Ok(Ok(0)) | Ok(Err(_)) => closed = true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// The answer to `request` read by the direct stream reader (the first
/// request on a connection) and by hyper (the same bytes after another
/// request on a kept-alive connection): 0 where none came.
async fn both_verdicts(h: &Herald, request: &[u8]) -> (u16, u16) {
    let mut direct = TcpStream::connect(h.public).await.unwrap();
    direct.write_all(request).await.unwrap();
    let d = statuses(&mut direct, 1).await.first().copied().unwrap_or(0);
    let mut hyper = TcpStream::connect(h.public).await.unwrap();
    let mut bytes = b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
    bytes.extend_from_slice(request);
    hyper.write_all(&bytes).await.unwrap();
    let got = statuses(&mut hyper, 2).await;
    assert_eq!(got.first(), Some(&404), "the first request reached hyper");
    (d, got.get(1).copied().unwrap_or(0))
}

#[tokio::test]
async fn the_direct_reader_is_as_strict_as_hyper() {
    let h = HeraldBuilder::new()
        .env("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "1000")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY", "1000")
        .env("LIMITS__SUBSCRIBE_BURST", "1000")
        .start();
    let t = token_for("reader", HOUR);
    let body = all_created("p1").to_string();
    let n = body.len();
    let head = |extra: &str| {
        format!(
            "POST {SUBSCRIBE} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\n{extra}\r\n{body}"
        )
    };
    let chunked = format!("{n:x}\r\n{body}\r\n0\r\n\r\n");
    let cases: Vec<(&str, String, u16)> = vec![
        ("valid", head(&format!("content-length: {n}\r\n")), 200),
        ("two equal lengths", head(&format!("content-length: {n}\r\ncontent-length: {n}\r\n")), 200),
        ("0 then a length", head(&format!("content-length: 0\r\ncontent-length: {n}\r\n")), 400),
        ("a length then 0", head(&format!("content-length: {n}\r\ncontent-length: 0\r\n")), 400),
        ("a signed length", head(&format!("content-length: +{n}\r\n")), 400),
        ("a negative length", head("content-length: -1\r\n"), 400),
        ("a hex length", head("content-length: 0x10\r\n"), 400),
        ("a list of lengths", head(&format!("content-length: {n}, {n}\r\n")), 400),
        ("a length with a space inside", head(&format!("content-length: {} {}\r\n", n / 10, n % 10)), 400),
        ("an overflowing length", head("content-length: 99999999999999999999999\r\n"), 400),
        ("padding around the length", head(&format!("content-length:   {n}   \r\n")), 200),
        ("space before the colon", head(&format!("content-length : {n}\r\n")), 400),
        ("obs-fold", head(&format!("content-length: {n}\r\nx-a: b\r\n c\r\n")), 400),
        ("NUL in a value", head(&format!("content-length: {n}\r\nx-a: a\0b\r\n")), 400),
        ("a bad header name", head(&format!("content-length: {n}\r\nx(a): b\r\n")), 400),
        (
            "chunked with a length",
            format!(
                "POST {SUBSCRIBE} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ncontent-length: {n}\r\ntransfer-encoding: chunked\r\n\r\n{chunked}"
            ),
            200,
        ),
        (
            "chunked on HTTP/1.0",
            format!(
                "POST {SUBSCRIBE} HTTP/1.0\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{chunked}"
            ),
            400,
        ),
        (
            "no Host on HTTP/1.1",
            format!(
                "POST {SUBSCRIBE} HTTP/1.1\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n{body}"
            ),
            400,
        ),
        ("two Hosts", head(&format!("host: y\r\ncontent-length: {n}\r\n")), 400),
        (
            "no Host on HTTP/1.0",
            format!(
                "POST {SUBSCRIBE} HTTP/1.0\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n{body}"
            ),
            200,
        ),
        (
            "bare LF line ends",
            head(&format!("content-length: {n}\r\n")).replace("\r\n", "\n"),
            200,
        ),
        (
            "two spaces in the request line",
            head(&format!("content-length: {n}\r\n")).replacen("POST ", "POST  ", 1),
            400,
        ),
    ];
    for (what, request, want) in cases {
        let (direct, hyper) = both_verdicts(&h, request.as_bytes()).await;
        assert_eq!(direct, hyper, "{what}: direct {direct}, hyper {hyper}");
        assert_eq!(direct, want, "{what}");
    }
}
