//! HTTP/1 event streams written straight to the socket.
//!
//! An SSE stream is most of herald's connections and all of its fan-out
//! work, yet it needs little of an HTTP/1 server: one request head, a small
//! body, one response head, then frames until the stream ends. hyper's h1
//! dispatcher keeps an 8 KiB read buffer and an 8 KiB write buffer per
//! connection for all of its life, and writes each frame as its own chunk.
//!
//! So the first request on a public connection is read here. When it is a
//! stream request the handler answers it as usual and [`StreamWriter`] writes
//! the response: the head, then every frame queued at a wake-up in one
//! vectored write of the shared bytes (each event is encoded once, as an
//! HTTP/1.1 chunk, for every connection: no copy, no per-connection buffer),
//! and the connection closes when the stream ends.
//! Anything else (h2c, another route, chunked or `Expect` bodies, a head
//! herald does not parse) is handed to hyper with the bytes already read put
//! back in front of the socket ([`Prefixed`]).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH};
use http::{Method, Request, Response, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{HttpBody, RequestBody, ServeOptions};
use crate::protocol::Dialect;
use crate::stream::{Item, SseStream};

/// The longest request head read here; a longer one is left to hyper.
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed here; more are left to hyper.
const MAX_HEADERS: usize = 48;
/// Frames and bytes gathered into one chunk and one write.
const MAX_BATCH_FRAMES: usize = 64;
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// A batch's slices: the head, its frames, the body's end.
const MAX_SLICES: usize = MAX_BATCH_FRAMES + 2;
/// Bytes a client may send on a connection that carries a stream before it is
/// dropped (nothing it sends is read for any purpose but noticing it left).
const MAX_IGNORED_INPUT: usize = 64 * 1024;

/// What the first request on a connection turned out to be.
// Not boxed: a box would live as long as the stream whose request it held.
#[allow(clippy::large_enum_variant)]
pub enum First {
    /// A stream request, read whole.
    Stream(Request<RequestBody>),
    /// Something for hyper: these bytes were already read from the socket.
    Pass(Bytes),
    /// Nothing more to do: the client left, was too slow, or was answered.
    Done,
}

/// Reads the first request of a connection. `is_stream` says from the method
/// and path (without query) whether a request is a stream request; `render`
/// answers an error in the listener's shape.
pub async fn read_first(
    tcp: &mut TcpStream,
    limits: &ServeOptions,
    is_stream: impl Fn(&Method, &str) -> bool,
    render: impl Fn(super::error::ApiError) -> Response<HttpBody>,
) -> First {
    let mut buf = BytesMut::with_capacity(2048);
    let head = tokio::time::timeout(limits.header_read_timeout, async {
        loop {
            match tokio::io::AsyncReadExt::read_buf(tcp, &mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            match parse_head(&buf, &is_stream) {
                Parsed::Partial if buf.len() < MAX_HEAD => {
                    if buf.capacity() == buf.len() {
                        buf.reserve(buf.len());
                    }
                }
                other => return Some(other),
            }
        }
    })
    .await;
    let (mut req, head_len, declared) = match head {
        Err(_) | Ok(None) => return First::Done,
        Ok(Some(Parsed::Stream(req, head_len, declared))) => (req, head_len, declared),
        Ok(Some(_)) => return First::Pass(buf.freeze()),
    };
    let _ = buf.split_to(head_len);
    let body = if declared > limits.max_body_bytes as u64 {
        // Not read: the handler refuses it by its declared length.
        Bytes::new()
    } else {
        let want = declared as usize;
        let read = tokio::time::timeout(limits.body_read_timeout, async {
            while buf.len() < want {
                buf.reserve(want - buf.len());
                match tokio::io::AsyncReadExt::read_buf(tcp, &mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                }
            }
            true
        })
        .await;
        match read {
            Ok(true) => buf.split_to(want).freeze(),
            Ok(false) => return First::Done,
            Err(_) => {
                let resp = render(super::error::ApiError::from(
                    crate::request::BodyError::Timeout,
                ));
                let head = response_head(&resp, Framing::Length(body_len(resp.body())));
                if let HttpBody::Full(body) = resp.into_body() {
                    write_complete(tcp, &head, body).await;
                }
                return First::Done;
            }
        }
    };
    *req.body_mut() = RequestBody::Buffered(Some(body));
    First::Stream(req)
}

fn body_len(b: &HttpBody) -> usize {
    match b {
        HttpBody::Full(b) => b.as_ref().map_or(0, Bytes::len),
        HttpBody::Stream(_) => 0,
    }
}

/// Writes a complete response and ends the connection; a client that reads
/// nothing cannot hold the task.
async fn write_complete(tcp: &mut TcpStream, head: &[u8], body: Option<Bytes>) {
    let done = async {
        tcp.write_all(head).await?;
        if let Some(b) = body {
            tcp.write_all(&b).await?;
        }
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
}

#[allow(clippy::large_enum_variant)] // one per connection, moved once
enum Parsed {
    /// More bytes are needed.
    Partial,
    /// Not for this module.
    Other,
    /// A stream request, the head's length and the declared body length.
    Stream(Request<RequestBody>, usize, u64),
}

fn parse_head(buf: &[u8], is_stream: &impl Fn(&Method, &str) -> bool) -> Parsed {
    // Decide early on what cannot be a stream request (h2c's preface, other
    // methods), so hyper gets it without waiting for more bytes.
    let starts = |m: &[u8]| {
        buf.len() >= m.len() && buf.starts_with(m) || buf.len() < m.len() && m.starts_with(buf)
    };
    if !starts(b"GET ") && !starts(b"POST ") {
        return Parsed::Other;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Parsed::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    let path = target.split('?').next().unwrap_or_default();
    if !is_stream(&method, path) {
        return Parsed::Other;
    }
    let mut builder = Request::builder()
        .method(method)
        .uri(target)
        .version(if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        });
    // Anything here that is not plainly right goes to hyper, which then gives
    // its own verdict: this reader is never laxer than hyper (RFC 9112 6.3,
    // RFC 9110 8.6), and a differential test holds it to that.
    let mut declared: Option<u64> = None;
    for h in parsed.headers.iter() {
        let name = h.name;
        // Bodies this module does not read, and upgrades, go to hyper.
        if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Parsed::Other;
        }
        if name.eq_ignore_ascii_case("content-length") {
            // One length, of digits only: no sign, no list, no second line.
            match (declared, content_length(h.value)) {
                (None, Some(n)) => declared = Some(n),
                _ => return Parsed::Other,
            }
        }
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Other;
        };
        builder = builder.header(n, v);
    }
    match builder.body(RequestBody::Buffered(None)) {
        Ok(req) => Parsed::Stream(req, head_len, declared.unwrap_or(0)),
        Err(_) => Parsed::Other,
    }
}

/// What the direct reader makes of the bytes of a request head.
#[derive(Debug)]
pub enum Probe {
    /// Not a complete head yet.
    Partial,
    /// Left to hyper.
    Hyper,
    /// Served here: the request's head, the head's length in bytes, and
    /// the body length it declares.
    Serve(Box<http::request::Parts>, usize, u64),
}

/// The direct reader's verdict on `buf` for the public API's routes, for
/// tests that hold it to hyper's.
#[doc(hidden)]
pub fn probe_head(buf: &[u8]) -> Probe {
    match parse_head(buf, &super::api::is_stream) {
        Parsed::Partial => Probe::Partial,
        Parsed::Other => Probe::Hyper,
        Parsed::Stream(req, head_len, declared) => {
            Probe::Serve(Box::new(req.into_parts().0), head_len, declared)
        }
    }
}

/// A `Content-Length` value: one to nineteen ASCII digits (httparse has
/// already trimmed the optional whitespace around it), as hyper reads it.
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// How a response body is delimited.
#[derive(Clone, Copy)]
enum Framing {
    /// `Content-Length`.
    Length(usize),
    /// `Transfer-Encoding: chunked` (HTTP/1.1 streams).
    Chunked,
    /// Ends when the connection closes (HTTP/1.0 streams).
    Close,
}

/// The status line and headers. Every response here ends its connection.
fn response_head(resp: &Response<HttpBody>, framing: Framing) -> Vec<u8> {
    let mut h = Vec::with_capacity(256);
    let status = resp.status();
    h.extend_from_slice(b"HTTP/1.1 ");
    h.extend_from_slice(status.as_str().as_bytes());
    h.push(b' ');
    h.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    h.extend_from_slice(b"\r\n");
    for (name, value) in resp.headers() {
        if name == CONNECTION || name == CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            h.extend_from_slice(b"content-length: ");
            h.extend_from_slice(n.to_string().as_bytes());
            h.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => h.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Close => {}
    }
    h.extend_from_slice(b"date: ");
    h.extend_from_slice(http_date(SystemTime::now()).as_bytes());
    h.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    h
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes the handler's answer to a stream request. A complete response is
/// written here; a stream is returned as the future that writes it, to run as
/// a task of its own (so nothing of the request's handling stays in memory
/// while it lives). Either way the connection ends with the response.
pub async fn respond(
    mut tcp: TcpStream,
    version: Version,
    resp: Response<HttpBody>,
) -> Option<StreamWriter> {
    let framing = match resp.body() {
        b @ HttpBody::Full(_) => Framing::Length(body_len(b)),
        HttpBody::Stream(_) if version == Version::HTTP_10 => Framing::Close,
        HttpBody::Stream(_) => Framing::Chunked,
    };
    let head = response_head(&resp, framing);
    // The headers are not kept for the life of the stream.
    match resp.into_body() {
        HttpBody::Full(b) => {
            write_complete(&mut tcp, &head, b).await;
            None
        }
        HttpBody::Stream(stream) => {
            let chunked = matches!(framing, Framing::Chunked);
            Some(StreamWriter {
                tcp,
                stream,
                chunked,
                out: Batch::with_head(head),
                ended: false,
                ignored: 0,
            })
        }
    }
}

/// `frame` as one HTTP/1.1 chunk: size line, the bytes, CRLF. This module
/// is the only one that knows HTTP/1.1 chunks.
fn chunk(frame: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(frame.len() + 20);
    buf.extend_from_slice(format!("{:x}\r\n", frame.len()).as_bytes());
    buf.extend_from_slice(frame);
    buf.extend_from_slice(b"\r\n");
    buf.freeze()
}

/// A dialect's heartbeat as a chunk, made once per process.
fn heartbeat_chunk(dialect: Dialect) -> Bytes {
    static CHUNKS: std::sync::OnceLock<Vec<Bytes>> = std::sync::OnceLock::new();
    let all = CHUNKS.get_or_init(|| Dialect::ALL.iter().map(|d| chunk(d.heartbeat())).collect());
    all[dialect.index()].clone()
}

/// A dialect's end line as a chunk, made once per process (a drain ends
/// every stream: none copies it).
fn end_line_chunk(dialect: Dialect) -> Bytes {
    static CHUNKS: std::sync::OnceLock<Vec<Bytes>> = std::sync::OnceLock::new();
    let all = CHUNKS.get_or_init(|| {
        Dialect::ALL
            .iter()
            .map(|d| d.end_line().map(chunk).unwrap_or_default())
            .collect()
    });
    all[dialect.index()].clone()
}

/// The bytes of one write: the response head (first write only), frames in
/// their wire form, and the body's end (last write only).
struct Batch {
    /// The response head before the first batch; afterwards empty.
    lead: Vec<u8>,
    lead_at: usize,
    frames: Vec<Bytes>,
    /// `frames[next..]` are unwritten, the first of them from `offset` on.
    next: usize,
    offset: usize,
    tail: &'static [u8],
    tail_at: usize,
}

impl Batch {
    fn with_head(head: Vec<u8>) -> Self {
        Batch {
            lead: head,
            lead_at: 0,
            frames: Vec::new(),
            next: 0,
            offset: 0,
            tail: b"",
            tail_at: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.lead_at == self.lead.len() && self.frames_written()
    }

    /// Whether the gathered frames (and the end, if sealed) are written; the
    /// head may not be.
    fn frames_written(&self) -> bool {
        self.next == self.frames.len() && self.tail_at == self.tail.len()
    }

    /// Appends the body's end: the last chunk, when the body is chunked.
    fn seal_end(&mut self, chunked: bool) {
        self.tail = if chunked { b"0\r\n\r\n" } else { b"" };
        self.tail_at = 0;
    }

    /// Fills `out` with what is left to write; returns how many slices.
    fn slices<'a>(&'a self, out: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
        let mut n = 0;
        let mut push = |b: &'a [u8]| {
            out[n] = IoSlice::new(b);
            n += 1;
        };
        if self.lead_at < self.lead.len() {
            push(&self.lead[self.lead_at..]);
        }
        for (i, f) in self.frames.iter().enumerate().skip(self.next) {
            let from = if i == self.next { self.offset } else { 0 };
            push(&f[from..]);
        }
        if self.tail_at < self.tail.len() {
            push(&self.tail[self.tail_at..]);
        }
        n
    }

    fn advance(&mut self, mut n: usize) {
        let k = (self.lead.len() - self.lead_at).min(n);
        self.lead_at += k;
        n -= k;
        if self.lead_at == self.lead.len() && !self.lead.is_empty() {
            self.lead = Vec::new();
            self.lead_at = 0;
        }
        while n > 0 && self.next < self.frames.len() {
            let left = self.frames[self.next].len() - self.offset;
            if n >= left {
                n -= left;
                self.next += 1;
                self.offset = 0;
            } else {
                self.offset += n;
                n = 0;
            }
        }
        self.tail_at += n.min(self.tail.len() - self.tail_at);
        if self.next == self.frames.len() {
            self.frames.clear();
            self.next = 0;
        }
    }
}

/// Drives one stream to its client: gathers what the stream has ready, writes
/// it in one vectored write, and notices the client leaving.
pub struct StreamWriter {
    tcp: TcpStream,
    stream: Box<SseStream>,
    chunked: bool,
    out: Batch,
    ended: bool,
    ignored: usize,
}

impl StreamWriter {
    /// Whether the client closed its side (or sent more than a stream client may).
    fn poll_client_gone(&mut self, cx: &mut Context<'_>) -> bool {
        let mut scratch = [0u8; 256];
        loop {
            match self.tcp.poll_read_ready(cx) {
                Poll::Pending => return false,
                Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(())) => match self.tcp.try_read(&mut scratch) {
                    Ok(0) => return true,
                    Ok(n) => {
                        self.ignored += n;
                        if self.ignored > MAX_IGNORED_INPUT {
                            return true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return true,
                },
            }
        }
    }

    /// Moves what the stream has ready into the batch.
    fn gather(&mut self, cx: &mut Context<'_>) {
        let mut bytes = 0;
        while !self.ended && self.out.frames.len() < MAX_BATCH_FRAMES && bytes < MAX_BATCH_BYTES {
            match self.stream.poll_item(cx) {
                Poll::Ready(Some(item)) => {
                    let data = self.wire(item);
                    bytes += data.len();
                    self.out.frames.push(data);
                }
                Poll::Ready(None) => self.ended = true,
                Poll::Pending => break,
            }
        }
        if self.ended {
            self.out.seal_end(self.chunked);
        }
    }

    /// An item as it goes on this connection: an HTTP/1.1 chunk (an event's
    /// made once, for every stream of its dialect), or as is on HTTP/1.0.
    fn wire(&self, item: Item) -> Bytes {
        let dialect = self.stream.dialect();
        match (item, self.chunked) {
            (Item::Event(d), true) => d.encoded(dialect).wire(chunk).clone(),
            (Item::Event(d), false) => d.encoded(dialect).frame().clone(),
            (Item::Frame(b), true) => chunk(&b),
            (Item::Frame(b), false) => b,
            (Item::Heartbeat, true) => heartbeat_chunk(dialect),
            (Item::Heartbeat, false) => Bytes::from_static(dialect.heartbeat()),
            (Item::EndLine, true) => end_line_chunk(dialect),
            (Item::EndLine, false) => Bytes::from_static(dialect.end_line().unwrap_or_default()),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let n = self.out.slices(&mut slices);
        Pin::new(&mut self.tcp).poll_write_vectored(cx, &slices[..n])
    }
}

impl std::future::Future for StreamWriter {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.poll_client_gone(cx) {
            return Poll::Ready(());
        }
        loop {
            if this.out.frames_written() && !this.ended {
                // The head goes out with the first frames.
                this.gather(cx);
            }
            if this.out.is_empty() {
                if this.ended {
                    let _ = ready!(Pin::new(&mut this.tcp).poll_shutdown(cx));
                    return Poll::Ready(());
                }
                return Poll::Pending;
            }
            match ready!(this.poll_write(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(n) => this.out.advance(n),
            }
        }
    }
}

/// A socket with bytes already read from it put back in front.
pub struct Prefixed {
    prefix: Bytes,
    tcp: TcpStream,
}

impl Prefixed {
    /// `prefix` is read before anything more from `tcp`.
    pub fn new(prefix: Bytes, tcp: TcpStream) -> Self {
        Prefixed { prefix, tcp }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_are_imf_fixdates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(http_date(t), "Thu, 29 Feb 2024 12:34:56 GMT");
    }

    fn stream_route(m: &Method, p: &str) -> bool {
        (m == Method::GET || m == Method::POST) && p == "/s"
    }

    #[test]
    fn heads_are_sorted_early() {
        assert!(matches!(
            parse_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &stream_route),
            Parsed::Other
        ));
        assert!(matches!(parse_head(b"PO", &stream_route), Parsed::Partial));
        assert!(matches!(
            parse_head(b"GET /s?x=1 HTTP/1.1\r\nhost: a\r\n", &stream_route),
            Parsed::Partial
        ));
        assert!(matches!(
            parse_head(b"GET /other HTTP/1.1\r\n\r\n", &stream_route),
            Parsed::Other
        ));
        assert!(matches!(
            parse_head(
                b"POST /s HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
                &stream_route
            ),
            Parsed::Other
        ));
        assert!(matches!(
            parse_head(
                b"POST /s HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
                &stream_route
            ),
            Parsed::Other
        ));
        let raw = b"POST /s?a=b HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
        match parse_head(raw, &stream_route) {
            Parsed::Stream(req, len, declared) => {
                assert_eq!(req.uri().query(), Some("a=b"));
                assert_eq!(req.headers()["host"], "x");
                assert_eq!(len, raw.len() - 2, "the head ends before the body");
                assert_eq!(declared, 2);
            }
            _ => panic!("not a stream request"),
        }
    }

    #[test]
    fn a_batch_survives_partial_writes() {
        let mut b = Batch::with_head(b"HEAD".to_vec());
        b.frames.push(Bytes::from_static(b"abc"));
        b.frames.push(Bytes::from_static(b"defg"));
        fn pending(b: &Batch) -> Vec<u8> {
            let mut s = [IoSlice::new(&[]); MAX_SLICES];
            let n = b.slices(&mut s);
            s[..n].iter().flat_map(|x| x.iter().copied()).collect()
        }
        let mut written = Vec::new();
        for step in [1, 4, 2, 3, 100] {
            let all = pending(&b);
            let n = step.min(all.len());
            written.extend_from_slice(&all[..n]);
            b.advance(n);
        }
        assert!(b.is_empty());
        assert_eq!(written, b"HEADabcdefg");
        b.seal_end(true);
        assert_eq!(pending(&b), b"0\r\n\r\n");
        b.advance(1);
        assert_eq!(pending(&b), b"\r\n\r\n");
        b.advance(4);
    }
}
