//! The one place where errors become HTTP responses.
//!
//! Every error is JSON: `{"error": {"code": "...", "message": "...", "details": {...}}}`
//! with the status of DESIGN.md section 4.

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::HttpBody;
use crate::auth::AuthError;
use crate::limits::Limit;

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
    /// An error with no details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
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

    /// Adds details (field names, limits).
    pub fn with_details(mut self, details: Value) -> Self {
        self.0.details = details;
        self
    }

    fn with_header(mut self, name: HeaderName, value: &'static str) -> Self {
        self.0.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    /// 400 naming a field.
    pub fn bad_field(
        code: &'static str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let field = field.into();
        let message = message.into();
        Self::new(StatusCode::BAD_REQUEST, code, format!("{field}: {message}"))
            .with_details(json!({"field": field}))
    }

    /// 401 for a refused token.
    pub fn unauthorized(e: &AuthError) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
            .with_details(json!({"reason": e.reason()}))
            .with_header(http::header::WWW_AUTHENTICATE, "Bearer")
    }

    /// 429 naming the limit.
    pub fn limited(limit: Limit, message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "limit_exceeded", message)
            .with_details(json!({"limit": limit.label()}))
            .with_header(http::header::RETRY_AFTER, "1")
    }

    /// 404.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// 405 with the allowed methods.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("allowed methods: {allow}"),
        )
        .with_header(http::header::ALLOW, allow)
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
        .with_details(json!({"limit": limit}))
    }

    /// 408: the body did not arrive within `server.body_read_timeout`.
    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body was not received in time",
        )
    }

    /// 415.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        )
    }

    /// The response.
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
