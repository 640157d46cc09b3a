//! The public API's routes: subscribe (POST, and GET for EventSource),
//! publish, CORS preflights.
//!
//! The handlers take what HTTP carries (the token from its header, query or
//! cookie; the body within its limits; `Last-Event-ID`), call the use cases
//! ([`Subscriptions`], [`Publisher`]), and render their results; every
//! refusal is rendered by `error`. Query strings can carry tokens and are
//! never logged.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, ORIGIN};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::json;

use super::body::read_limited;
use super::cors::Cors;
use super::error::{json_response, sse_response, subscribe_refusal, ApiError};
use super::stuck::ConnectionAbort;
use super::{Handler, HttpBody, RequestBody};
use crate::protocol::Dialect;
use crate::publish::{PublishError, Publisher};
use crate::request::{parse_json, resume_point, BodyError, PathSemantics, SubscribeRequest};
use crate::stream::{CloseWatch, SseStream};
use crate::subscribe::{SubscribeError, Subscriptions};

/// Subscribe route.
pub const SUBSCRIBE_PATH: &str = "/api/v1/events/subscribe/project-events";
/// Publish route.
pub const PUBLISH_PATH: &str = "/api/v1/events/publish";

/// What a route serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Subscribe,
    Publish,
}

/// The route table: path, what it serves, the methods it takes (besides
/// `OPTIONS`, the CORS preflight).
const ROUTES: &[(&str, Route, &[Method], &str)] = &[
    (
        SUBSCRIBE_PATH,
        Route::Subscribe,
        &[Method::GET, Method::POST],
        "GET, POST, OPTIONS",
    ),
    (
        PUBLISH_PATH,
        Route::Publish,
        &[Method::POST],
        "POST, OPTIONS",
    ),
];

/// Whether a request opens an event stream (the direct HTTP/1 writer's
/// question, answered by the same table as dispatch).
pub fn is_stream(method: &Method, path: &str) -> bool {
    ROUTES
        .iter()
        .any(|(p, r, m, _)| *r == Route::Subscribe && *p == path && m.contains(method))
}

/// Request bodies' bounds.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// Largest body.
    pub max_bytes: usize,
    /// Time to receive it.
    pub timeout: std::time::Duration,
}

/// The public listener's handler.
#[derive(Clone)]
pub struct Api {
    /// Opening streams.
    pub subscriptions: Arc<Subscriptions>,
    /// Taking events.
    pub publisher: Arc<Publisher>,
    /// Browser access.
    pub cors: Cors,
    /// Request bodies' bounds.
    pub body: BodyLimits,
    /// How this listener's streams are written (and how their `secretPath`
    /// reads: a folder and below natively, exactly as Infisical does).
    pub dialect: Dialect,
}

impl Handler for Api {
    fn is_stream(&self, method: &Method, path: &str) -> bool {
        is_stream(method, path)
    }

    fn serves_streams(&self) -> bool {
        true
    }

    fn render(&self, e: ApiError) -> Response<HttpBody> {
        self.error(e)
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        _peer: SocketAddr,
    ) -> Response<HttpBody> {
        let origin = req.headers().get(ORIGIN).cloned();
        let method = req.method().clone();
        // The body may go unread (refused before reading it): then the
        // connection cannot be reused, so tell the client instead of letting it race.
        let unread_body = req.version() < http::Version::HTTP_2
            && (req.headers().contains_key(CONTENT_LENGTH)
                || req.headers().contains_key(http::header::TRANSFER_ENCODING));
        let route = ROUTES.iter().find(|(p, ..)| *p == req.uri().path());
        let mut resp = match (route, super::check_host(&req)) {
            (_, Err(e)) => self.error(e),
            (None, _) => self.error(ApiError::not_found()),
            (Some((_, _, _, allow)), _) if method == Method::OPTIONS => self.preflight(allow),
            (Some((_, route, methods, allow)), _) if !methods.contains(&method) => {
                let _ = route;
                self.error(ApiError::method_not_allowed(allow))
            }
            (Some((_, Route::Subscribe, ..)), _) => self.subscribe(req).await,
            (Some((_, Route::Publish, ..)), _) => self.publish(req).await,
        };
        if unread_body && !resp.status().is_success() {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        self.cors.decorate(origin.as_ref(), resp.headers_mut());
        resp
    }
}

impl Api {
    /// An error in this listener's shape.
    fn error(&self, e: ApiError) -> Response<HttpBody> {
        match self.dialect {
            Dialect::Native => e.into_response(),
            Dialect::Infisical => e.into_infisical_response(),
        }
    }

    fn preflight(&self, allow: &'static str) -> Response<HttpBody> {
        let mut resp = Response::new(HttpBody::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        self.cors.preflight(allow, resp.headers_mut());
        resp
    }

    async fn subscribe(&self, req: Request<RequestBody>) -> Response<HttpBody> {
        let outcome = self.open_stream(req).await;
        self.subscriptions.count(&outcome);
        match outcome {
            Ok(stream) => sse_response(HttpBody::Stream(Box::new(stream))),
            Err(e) => {
                tracing::debug!(result = e.label(), "subscribe refused");
                subscribe_refusal(e, self.dialect, self.subscriptions.streams.retry)
            }
        }
    }

    async fn open_stream(&self, req: Request<RequestBody>) -> Result<SseStream, SubscribeError> {
        let subs = &self.subscriptions;
        subs.check_open()?;
        let query = parse_query(&req);
        // A browser's EventSource can only GET, and cannot set headers.
        let browser = req.method() == Method::GET;
        let caller = subs
            .caller(bearer_token(req.headers(), &query, browser))
            .await?;
        let last_event_id = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok());
        let resume = resume_point(last_event_id, &query);
        let watch = req
            .extensions()
            .get::<Arc<ConnectionAbort>>()
            .map(|a| a.clone() as Arc<dyn CloseWatch>);
        let semantics = match self.dialect {
            Dialect::Native => PathSemantics::FolderAndBelow,
            Dialect::Infisical => PathSemantics::Exact,
        };
        let request = if browser {
            SubscribeRequest::from_query(&query, semantics, subs.limits)?
        } else {
            let body = self.read_json(req).await?;
            SubscribeRequest::from_json(&body, semantics, subs.limits)?
        };
        subs.open(&caller, request, resume, self.dialect, watch)
            .await
    }

    async fn publish(&self, req: Request<RequestBody>) -> Response<HttpBody> {
        let outcome = async {
            let caller = self
                .publisher
                .caller(bearer_token(req.headers(), &[], false))
                .await?;
            let body = parse_json(&self.read_json(req).await?)?;
            self.publisher.publish(&caller, body).await
        }
        .await;
        self.publisher.count(&outcome);
        match outcome {
            Ok(published) => {
                let ids: Vec<&str> = published.iter().map(|p| p.id.as_str()).collect();
                json_response(
                    StatusCode::ACCEPTED,
                    &json!({"ids": ids, "events": published}),
                )
            }
            Err(e) => {
                tracing::debug!(result = PublishError::label(&e), "publish refused");
                self.error(ApiError::from(e))
            }
        }
    }

    /// A JSON body within the size and time limits.
    async fn read_json(&self, req: Request<RequestBody>) -> Result<bytes::Bytes, BodyError> {
        if !is_json(req.headers()) {
            return Err(BodyError::NotJson);
        }
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let metrics = &self.subscriptions.metrics;
        read_limited(
            req.into_body(),
            declared,
            self.body.max_bytes,
            self.body.timeout,
            metrics,
        )
        .await
    }
}

/// The bearer token: the `Authorization` header; for a browser's GET also
/// the `access_token` query parameter or the `herald_token` cookie.
fn bearer_token<'a>(
    headers: &'a HeaderMap,
    query: &'a [(String, String)],
    browser: bool,
) -> Option<&'a str> {
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, rest) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim());
    }
    if !browser {
        return None;
    }
    if let Some((_, t)) = query.iter().find(|(k, _)| k == "access_token") {
        return Some(t);
    }
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(';'))
        .find_map(|kv| kv.trim().strip_prefix("herald_token="))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json"
                || m == "application/cloudevents+json"
                || m == "application/cloudevents-batch+json"
        })
        .unwrap_or(false)
}

fn parse_query(req: &Request<RequestBody>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}
