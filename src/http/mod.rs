//! HTTP: the listener loop, the response body type, and the two route tables.
//!
//! [`serve`] accepts TCP connections, bounds the protocol-detection read (the
//! HTTP/1-or-2 auto builder has no timeout of its own), and serves each
//! connection with hyper-util's auto builder (HTTP/1.1 and h2c) under a
//! graceful-shutdown watcher, except HTTP/1 stream requests, which `direct`
//! reads and writes itself. `api` holds the public routes, `admin` the
//! operator routes, `error` the single mapping from errors to JSON responses.

pub mod admin;
pub mod api;
pub mod body;
pub mod cors;
pub mod direct;
pub mod error;
pub mod stuck;
pub mod webhook;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::setting::{self, Invalid};
use crate::shutdown::{Phase, Shutdown};
use crate::stream::{Item, SseStream};
use serde::{Deserialize, Serialize};
use stuck::{ConnectionAbort, DropWhenStuck};
use tokio_util::task::TaskTracker;

/// Every response body herald sends: a complete buffer or an SSE stream.
pub enum HttpBody {
    /// A complete body (JSON, metrics text, empty).
    Full(Option<Bytes>),
    /// A live event stream.
    Stream(Box<SseStream>),
}

impl HttpBody {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        HttpBody::Full(Some(b.into()))
    }

    /// No body.
    pub fn empty() -> Self {
        HttpBody::Full(None)
    }
}

impl Body for HttpBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            HttpBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            // A stream through hyper: its items as plain SSE bytes (hyper
            // adds the HTTP/1.1 chunks or HTTP/2 frames).
            HttpBody::Stream(s) => s.poll_item(cx).map(|item| {
                item.map(|item| {
                    let dialect = s.dialect();
                    Ok(Frame::data(match item {
                        Item::Event(d) => d.encoded(dialect).frame().clone(),
                        Item::Frame(b) => b,
                        Item::Heartbeat => Bytes::from_static(dialect.heartbeat()),
                        Item::EndLine => Bytes::from_static(dialect.end_line().unwrap_or_default()),
                    }))
                })
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            HttpBody::Full(b) => b.is_none(),
            HttpBody::Stream(s) => s.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            HttpBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            HttpBody::Full(None) => SizeHint::with_exact(0),
            HttpBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// A request body: hyper's, or one read whole by `direct`.
pub enum RequestBody {
    /// Read by hyper.
    Incoming(Incoming),
    /// Read already.
    Buffered(Option<Bytes>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Buffered(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Incoming(b) => b.is_end_stream(),
            RequestBody::Buffered(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Incoming(b) => b.size_hint(),
            RequestBody::Buffered(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RequestBody::Buffered(None) => SizeHint::with_exact(0),
        }
    }
}

/// RFC 9112 section 3.2: an HTTP/1.1 request carries exactly one `Host`
/// (HTTP/2 names the authority in its own way; HTTP/1.0 may omit it).
/// Checked for every request on both HTTP/1 paths, so neither is laxer.
pub fn check_host<B>(req: &Request<B>) -> Result<(), error::ApiError> {
    if req.version() != http::Version::HTTP_11 {
        return Ok(());
    }
    match req.headers().get_all(http::header::HOST).iter().count() {
        1 => Ok(()),
        0 => Err(error::ApiError::bad_host(
            "an HTTP/1.1 request needs a Host header",
        )),
        _ => Err(error::ApiError::bad_host(
            "an HTTP/1.1 request has one Host header",
        )),
    }
}

/// Connection-level settings of a listener.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Time allowed for the first byte and for the request head.
    pub header_read_timeout: Duration,
    /// Time allowed for a request body read by `direct`.
    pub body_read_timeout: Duration,
    /// The largest request body read by `direct` (a larger declared one is
    /// passed on unread, with its `Content-Length`, for the handler to refuse).
    pub max_body_bytes: usize,
}

/// A request handler.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<HttpBody>> + Send;

    /// Whether a request with this method and path (no query) opens an
    /// event stream; the first such request on an HTTP/1 connection is
    /// served by `direct` instead of hyper.
    fn is_stream(&self, _method: &Method, _path: &str) -> bool {
        false
    }

    /// An error as this listener answers it (its dialect's shape), for
    /// what `direct` refuses before the handler sees the request.
    fn render(&self, e: error::ApiError) -> Response<HttpBody> {
        e.into_response()
    }

    /// Whether this listener serves streams at all (if not, `direct` never
    /// reads its connections).
    fn serves_streams(&self) -> bool {
        false
    }
}

/// How long the accept loop waits after a failed accept: 10 ms, doubling to
/// a second, back to 10 ms after a success.
#[derive(Default)]
struct AcceptBackoff(u32);

impl AcceptBackoff {
    fn next(&mut self) -> Duration {
        let wait = Duration::from_millis(10u64 << self.0.min(7)).min(Duration::from_secs(1));
        self.0 = self.0.saturating_add(1);
        wait
    }

    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// What one connection's task needs.
struct ConnectionParts<H> {
    tcp: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    opts: ServeOptions,
    watcher: hyper_util::server::graceful::Watcher,
    abort: Arc<ConnectionAbort>,
    writers: TaskTracker,
}

/// Serves one connection: an HTTP/1 stream request first on it goes to
/// `direct` (its stream then runs as a task of its own); everything else to
/// hyper, with the bytes already read put back in front.
async fn serve_connection<H: Handler>(parts: ConnectionParts<H>) {
    let ConnectionParts {
        mut tcp,
        peer,
        handler,
        builder,
        opts,
        watcher,
        abort,
        writers,
    } = parts;
    // A task is as large as its largest state: every long wait inside is
    // boxed, and an HTTP/1 stream moves to a small task of its own.
    let prefix = if handler.serves_streams() {
        let is_stream = |m: &Method, p: &str| handler.is_stream(m, p);
        let render = |e: error::ApiError| handler.render(e);
        match Box::pin(direct::read_first(&mut tcp, &opts, is_stream, render)).await {
            direct::First::Done => return,
            direct::First::Pass(prefix) => prefix,
            direct::First::Stream(mut req) => {
                req.extensions_mut().insert(abort.clone());
                let version = req.version();
                let resp = Box::pin(handler.handle(req, peer)).await;
                if let Some(writer) = Box::pin(direct::respond(tcp, version, resp)).await {
                    // The stream in a task of its own, dropped with its
                    // connection if it cannot end.
                    writers.spawn(DropWhenStuck::new(writer, abort));
                }
                return;
            }
        }
    } else {
        let mut first = [0u8; 1];
        let peek = tokio::time::timeout(opts.header_read_timeout, tcp.peek(&mut first));
        match Box::pin(peek).await {
            Ok(Ok(n)) if n > 0 => Bytes::new(),
            _ => return, // silent, closed or failed before the first byte
        }
    };
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(RequestBody::Incoming);
        req.extensions_mut().insert(abort.clone());
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h.handle(req, peer).await) }
    });
    let io = TokioIo::new(direct::Prefixed::new(prefix, tcp));
    let conn = builder.serve_connection(io, service);
    if let Err(e) = Box::pin(watcher.watch(conn.into_owned())).await {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// hyper as herald configures it for every connection it serves (also the
/// reference the direct reader is tested against).
pub fn connection_builder(opts: &ServeOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    builder
}

/// Accepts and serves connections until `shutdown` reaches `Phase::Stopped`,
/// then waits up to `deadline` for open connections to finish.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    opts: ServeOptions,
    shutdown: Shutdown,
    deadline: Duration,
) {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(connection_builder(&opts));
    let tasks = TaskTracker::new();
    let stopped = shutdown.reached(Phase::Stopped);
    tokio::pin!(stopped);
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => {
                backoff.reset();
                x
            }
            Err(e) => {
                // Out of file descriptors and the like: the pending connection
                // stays in the backlog, so waiting (longer each time, up to a
                // second) instead of spinning lets closing streams free some.
                let wait = backoff.next();
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let abort = Arc::new(ConnectionAbort::default());
        let connection = serve_connection(ConnectionParts {
            tcp,
            peer,
            handler: handler.clone(),
            builder: builder.clone(),
            opts,
            watcher: graceful.watcher(),
            abort: abort.clone(),
            writers: tasks.clone(),
        });
        // A stream that cannot write its closing event drops the connection
        // (see `stuck`).
        tasks.spawn(DropWhenStuck::new(connection, abort));
    }
    drop(listener);
    // Every connection task and stream writer of this listener is tracked:
    // hyper's connections are asked to finish, and all are waited for.
    tasks.close();
    let finished = async {
        graceful.shutdown().await;
        tasks.wait().await;
    };
    if tokio::time::timeout(deadline, finished).await.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "connections still open at the shutdown deadline; closing them"
        );
    }
}
/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public listener (API and streams).
    pub listen: SocketAddr,
    /// Admin listener (metrics, health, admin views). Keep it private.
    pub admin_listen: SocketAddr,
    /// A second public listener whose streams speak Infisical's dialect
    /// (its event names and payload, `event: ping`, exact `secretPath`),
    /// for Infisical's operator and CLI; off unless set.
    pub infisical_listen: Option<SocketAddr>,
    /// Time allowed for a client to send the request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time allowed for a client to send a request body.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Runtime worker threads; 0 means one per core.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8080).into(),
            admin_listen: ([127, 0, 0, 1], 9090).into(),
            infisical_listen: None,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            worker_threads: 0,
        }
    }
}

impl ServerConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        let one_ms = Duration::from_millis(1);
        setting::duration(
            "server.header_read_timeout",
            self.header_read_timeout,
            one_ms,
            setting::MAX_DURATION,
        )?;
        setting::duration(
            "server.body_read_timeout",
            self.body_read_timeout,
            one_ms,
            setting::MAX_DURATION,
        )
    }
}
