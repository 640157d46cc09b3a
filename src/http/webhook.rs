//! The webhook receiver's listener: `POST {ingest.webhook.path}` with
//! Infisical's signed body, answered in JSON (`ingest::webhook` checks and
//! takes it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::body::read_limited;
use super::error::json_response;
use super::{Handler, HttpBody, RequestBody};
use crate::ingest::webhook::{Receiver, Refusal, Taken, SIGNATURE_HEADER};
use crate::metrics::Metrics;

/// Most deliveries taken at once; more are answered 503 at once (Infisical
/// sends one per change: many at once is someone else).
const MAX_AT_ONCE: usize = 256;

/// The listener's handler.
pub struct Webhook {
    receiver: Receiver,
    taking: tokio::sync::Semaphore,
    body_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Webhook {
    /// Serves `receiver`; bodies must come within `body_timeout`.
    pub fn new(receiver: Receiver, body_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            receiver,
            taking: tokio::sync::Semaphore::new(MAX_AT_ONCE),
            body_timeout,
            metrics,
        }
    }

    async fn receive(&self, req: Request<RequestBody>) -> Result<Taken, Refusal> {
        let header = req.headers().get(SIGNATURE_HEADER).map(|v| v.as_bytes());
        let signature = self.receiver.check_header(header)?;
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = read_limited(
            req.into_body(),
            declared,
            self.receiver.config().max_body_bytes,
            self.body_timeout,
            &self.metrics,
        )
        .await
        .map_err(|_| Refusal::Body)?;
        self.receiver.take(&signature, &body).await
    }
}

fn status(r: Refusal) -> StatusCode {
    match r {
        Refusal::Unsigned
        | Refusal::MalformedSignature
        | Refusal::BadSignature
        | Refusal::Stale => StatusCode::UNAUTHORIZED,
        Refusal::WrongProject => StatusCode::FORBIDDEN,
        Refusal::Busy => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Body => StatusCode::PAYLOAD_TOO_LARGE,
        Refusal::MalformedBody | Refusal::BadEvent => StatusCode::BAD_REQUEST,
        Refusal::UnsupportedEvent => StatusCode::OK,
    }
}

impl Handler for Webhook {
    async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        _peer: SocketAddr,
    ) -> Response<HttpBody> {
        if req.uri().path() != self.receiver.config().path {
            return json_response(StatusCode::NOT_FOUND, &json!({"message": "not found"}));
        }
        if req.method() != Method::POST {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"message": "POST the webhook here"}),
            );
        }
        let refuse = |r: Refusal| {
            self.receiver.refused(r);
            json_response(
                status(r),
                &json!({"message": r.message(), "reason": r.label()}),
            )
        };
        let Ok(_taking) = self.taking.try_acquire() else {
            return refuse(Refusal::Busy);
        };
        match self.receive(req).await {
            Ok(Taken::Published { id, sequence }) => json_response(
                StatusCode::ACCEPTED,
                &json!({"status": "published", "id": id, "sequence": sequence}),
            ),
            Ok(Taken::Duplicate { id }) => json_response(
                StatusCode::ACCEPTED,
                &json!({"status": "duplicate", "id": id}),
            ),
            Ok(Taken::Test) => json_response(
                StatusCode::ACCEPTED,
                &json!({"status": "test delivery received; nothing published"}),
            ),
            Ok(Taken::Unavailable(e)) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "unavailable", "error": e}),
            ),
            Err(r) => refuse(r),
        }
    }
}
