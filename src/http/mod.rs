//! HTTP: the listener loop, the response body type, and the two route tables.
//!
//! [`serve`] accepts TCP connections, bounds the protocol-detection read (the
//! HTTP/1-or-2 auto builder has no timeout of its own), and serves each
//! connection with hyper-util's auto builder (HTTP/1.1 and h2c) under a
//! graceful-shutdown watcher. `api` holds the public routes, `admin` the
//! operator routes, `error` the single mapping from errors to JSON responses.

pub mod admin;
pub mod api;
pub mod error;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::shutdown::{Phase, Shutdown};
use crate::stream::{ConnectionAbort, SseStream};

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
            HttpBody::Stream(s) => Pin::new(&mut **s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            HttpBody::Full(b) => b.is_none(),
            HttpBody::Stream(s) => s.is_end_stream(),
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

/// Connection-level settings of a listener.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Time allowed for the first byte and for the request head.
    pub header_read_timeout: Duration,
}

/// A request handler.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<HttpBody>> + Send;
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
    let builder = Arc::new(builder);
    let stopped = shutdown.reached(Phase::Stopped);
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let watcher = graceful.watcher();
        let handler = handler.clone();
        let builder = builder.clone();
        let abort = Arc::new(ConnectionAbort::default());
        let for_requests = abort.clone();
        let task = tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(opts.header_read_timeout, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return, // silent, closed or failed before the first byte
            }
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(for_requests.clone());
                let h = handler.clone();
                async move { Ok::<_, Infallible>(h.handle(req, peer).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
        // A stream that cannot write its closing event drops the connection by
        // aborting this task (see `ConnectionAbort`).
        abort.set(task.abort_handle());
    }
    drop(listener);
    if tokio::time::timeout(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the shutdown deadline; closing them");
    }
}
