//! The one place where errors become HTTP responses.
//!
//! Every error is JSON: `{"error": {"code": "...", "message": "...", "details": {...}}}`
//! with the status of DESIGN.md section 4. Each use case's typed error is
//! mapped here, in one `match` each: [`SubscribeError`], [`PublishError`],
//! [`RequestError`], [`BodyError`] and [`AuthError`]. A subscribe that herald
//! cannot serve now (draining, bus trouble) is not an error for the client:
//! it is answered 200 with an immediate `reconnect` ([`subscribe_refusal`]),
//! because a browser's EventSource gives up for good on anything else.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::HttpBody;
use crate::auth::AuthError;
use crate::limits::Limit;
use crate::protocol::{jittered_retry_ms, Close, Control, Dialect, ReconnectReason};
use crate::publish::PublishError;
use crate::request::{BodyError, RequestError};
use crate::subscribe::SubscribeError;

/// An error answer (boxed: it travels through many `Result`s on the way out).
#[derive(Debug)]
pub struct ApiError(Box<Inner>);

#[derive(Debug)]
struct Inner {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Value,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self(Box::new(Inner {
            status,
            code,
            message: message.into(),
            details: json!({}),
            headers: Vec::new(),
        }))
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        self.0.code
    }

    fn with_details(mut self, details: Value) -> Self {
        self.0.details = details;
        self
    }

    fn with_header(mut self, name: HeaderName, value: &'static str) -> Self {
        self.0.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    /// No route.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// The route takes other methods.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("allowed methods: {allow}"),
        )
        .with_header(http::header::ALLOW, allow)
    }

    fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        )
    }

    /// An HTTP/1.1 request without exactly one `Host`.
    pub fn bad_host(message: &'static str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("host: {message}"),
        )
        .with_details(json!({"field": "host"}))
    }

    fn limited(limit: Limit, message: String) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "limit_exceeded", message)
            .with_details(json!({"limit": limit.label()}))
            .with_header(http::header::RETRY_AFTER, "1")
    }

    /// The response.
    /// The response in Infisical's shape: `{"statusCode", "message",
    /// "error"}` (its clients log `message`), with herald's code and
    /// details beside.
    pub fn into_infisical_response(self) -> Response<HttpBody> {
        let e = *self.0;
        let body = json!({"statusCode": e.status.as_u16(), "message": e.message,
                          "error": e.code, "details": e.details});
        let mut resp = json_response(e.status, &body);
        for (k, v) in e.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }

    pub fn into_response(self) -> Response<HttpBody> {
        let e = *self.0;
        let body = json!({"error": {"code": e.code, "message": e.message, "details": e.details}});
        let mut resp = json_response(e.status, &body);
        for (k, v) in e.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        if let AuthError::ProviderUnavailable = e {
            // Not the client's fault: the token may be fine; come back.
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "provider_unavailable",
                e.to_string(),
            )
            .with_details(json!({"reason": e.reason()}))
            .with_header(http::header::RETRY_AFTER, "2");
        }
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
            .with_details(json!({"reason": e.reason()}))
            .with_header(http::header::WWW_AUTHENTICATE, "Bearer")
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let mut details = json!({"field": e.field});
        if let Some(limit) = e.limit {
            details["limit"] = limit.into();
        }
        ApiError::new(StatusCode::BAD_REQUEST, e.kind.code(), e.to_string()).with_details(details)
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::TooLarge { limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                e.to_string(),
            )
            .with_details(json!({"limit": limit})),
            BodyError::Timeout => {
                ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", e.to_string())
            }
            BodyError::Unreadable => {
                ApiError::new(StatusCode::BAD_REQUEST, "body_error", e.to_string())
            }
            BodyError::NotJson => ApiError::unsupported_media_type(),
        }
    }
}

impl From<SubscribeError> for ApiError {
    fn from(e: SubscribeError) -> Self {
        let message = e.to_string();
        match e {
            SubscribeError::Unauthorized(a) => a.into(),
            SubscribeError::Invalid(r) => r.into(),
            SubscribeError::Body(b) => b.into(),
            SubscribeError::RateLimited => ApiError::limited(Limit::SubscribeRate, message),
            SubscribeError::Limited { limit, .. } => ApiError::limited(limit, message),
            SubscribeError::Forbidden {
                index, interest, ..
            } => {
                let mut details = json!(interest);
                details["registration"] = index.into();
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).with_details(details)
            }
            SubscribeError::Draining | SubscribeError::BusUnavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable", message)
            }
        }
    }
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        let message = e.to_string();
        match e {
            PublishError::Unauthorized(a) => a.into(),
            PublishError::Invalid(r) => r.into(),
            PublishError::Body(b) => b.into(),
            PublishError::InvalidEvent {
                index,
                source,
                limit,
            } => {
                let field = match index {
                    Some(i) => format!("[{i}].{}", source.field),
                    None => source.field.clone(),
                };
                if source.kind == crate::event::EventErrorKind::TooLarge {
                    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "event_too_large", message)
                        .with_details(json!({"field": field, "limit": limit}))
                } else {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_event", message)
                        .with_details(json!({"field": field}))
                }
            }
            PublishError::Forbidden { index, .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
                    .with_details(json!({"index": index}))
            }
            PublishError::BusUnavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable", message)
            }
        }
    }
}

/// The answer to a subscribe that was not opened: an immediate `reconnect`
/// on a 200 stream when herald could serve it later (draining, bus trouble),
/// otherwise the error. `retry` is the base of the jittered `retry:` hint.
pub fn subscribe_refusal(
    e: SubscribeError,
    dialect: Dialect,
    retry: Duration,
) -> Response<HttpBody> {
    let reason = match &e {
        SubscribeError::Draining => ReconnectReason::Draining,
        SubscribeError::BusUnavailable(cause) => {
            tracing::warn!(error = %cause, "cannot take interest for a new stream; telling it to reconnect");
            ReconnectReason::BusUnavailable
        }
        // Infisical's operator never retries a subscribe answered above
        // 399: a stream herald could serve later is opened and ended with
        // an `error` (which makes the operator re-fetch, then come back).
        SubscribeError::Limited { .. }
        | SubscribeError::RateLimited
        | SubscribeError::Unauthorized(crate::auth::AuthError::ProviderUnavailable)
            if dialect == Dialect::Infisical =>
        {
            return sse_response(HttpBody::full(crate::protocol::infisical::error_frame(
                &e.to_string(),
            )));
        }
        _ if dialect == Dialect::Infisical => return ApiError::from(e).into_infisical_response(),
        _ => return ApiError::from(e).into_response(),
    };
    let close = Close::Reconnect {
        reason,
        retry_ms: jittered_retry_ms(retry),
    };
    sse_response(HttpBody::full(
        dialect.encode_control(&Control::Close(close), 0),
    ))
}

/// A `200 text/event-stream` head for `body`.
pub fn sse_response(body: HttpBody) -> Response<HttpBody> {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Response<HttpBody> {
    let mut resp = Response::new(HttpBody::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}
