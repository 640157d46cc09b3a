//! The public API: subscribe (POST and GET for EventSource), publish, CORS.
//!
//! Order of checks on a subscribe: draining (answered 200 + `reconnect`, since a
//! browser's EventSource gives up for good on any non-200), token (401),
//! subscribe rate (429), request shape (400/413/415), permission for every
//! registration (403 naming it), connection limits (429), then the stream.
//! Query strings can carry tokens and are never logged.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, ORIGIN};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{json_response, ApiError};
use super::{Handler, HttpBody, RequestBody};
use crate::app::App;
use crate::auth::{AuthError, Caller};
use crate::event::{Event, EventType};
use crate::ident::{EnvSlug, ProjectId};
use crate::interest::Interest;
use crate::path::PathPattern;
use crate::policy::Action;
use crate::protocol::{jittered_retry_ms, Close, Control, Dialect, ReconnectReason};
use crate::stream::{new_stream, ConnectionAbort, StreamSettings, Subscriber};

/// Subscribe route.
pub const SUBSCRIBE_PATH: &str = "/api/v1/events/subscribe/project-events";
/// Publish route.
pub const PUBLISH_PATH: &str = "/api/v1/events/publish";

/// The public listener's handler.
pub struct Api(pub Arc<App>);

impl Handler for Api {
    fn stream_path(&self) -> Option<&'static str> {
        Some(SUBSCRIBE_PATH)
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        _peer: SocketAddr,
    ) -> Response<HttpBody> {
        let app = &self.0;
        let origin = req.headers().get(ORIGIN).cloned();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let http1 = req.version() < http::Version::HTTP_2;
        let has_body = req.headers().contains_key(CONTENT_LENGTH)
            || req.headers().contains_key(http::header::TRANSFER_ENCODING);
        if let Err(e) = super::check_host(&req) {
            let mut resp = e.into_response();
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        let result = match (path.as_str(), &method) {
            (SUBSCRIBE_PATH | PUBLISH_PATH, &Method::OPTIONS) => Ok(preflight(app, &path)),
            (SUBSCRIBE_PATH, &Method::GET | &Method::POST) => subscribe(app, req).await,
            (SUBSCRIBE_PATH, _) => Err(ApiError::method_not_allowed("GET, POST, OPTIONS")),
            (PUBLISH_PATH, &Method::POST) => publish(app, req).await,
            (PUBLISH_PATH, _) => Err(ApiError::method_not_allowed("POST, OPTIONS")),
            _ => Err(ApiError::not_found()),
        };
        let mut resp = result.unwrap_or_else(|e| {
            tracing::debug!(%method, path = %path, status = e.status().as_u16(), code = e.code(), "request refused");
            let mut resp = e.into_response();
            // The body may be unread (refused before reading it): the connection
            // cannot be reused, so tell the client instead of letting it race.
            if http1 && has_body {
                resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        });
        add_cors(app, origin.as_ref(), resp.headers_mut());
        resp
    }
}

/// Whether `origin` may call the API, and whether with credentials.
fn cors_decision(app: &App, origin: &HeaderValue) -> Option<(HeaderValue, bool)> {
    let list = &app.config.cors.allowed_origins;
    let o = origin.to_str().ok()?;
    if list.iter().any(|a| a == o) {
        return Some((origin.clone(), true));
    }
    // A wildcard never goes with credentials.
    if list.iter().any(|a| a == "*") {
        return Some((HeaderValue::from_static("*"), false));
    }
    None
}

fn add_cors(app: &App, origin: Option<&HeaderValue>, h: &mut HeaderMap) {
    if app.config.cors.allowed_origins.is_empty() {
        return;
    }
    h.append(http::header::VARY, HeaderValue::from_static("Origin"));
    let Some((allow, creds)) = origin.and_then(|o| cors_decision(app, o)) else {
        return;
    };
    h.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    if creds {
        h.insert(
            http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

fn preflight(app: &App, path: &str) -> Response<HttpBody> {
    let mut resp = Response::new(HttpBody::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    if !app.config.cors.allowed_origins.is_empty() {
        let h = resp.headers_mut();
        let methods = if path == PUBLISH_PATH {
            "POST, OPTIONS"
        } else {
            "GET, POST, OPTIONS"
        };
        h.insert(
            http::header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        h.insert(
            http::header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, last-event-id"),
        );
        h.insert(
            http::header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    resp
}

/// Where a token may come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TokenSources {
    /// Only `Authorization: Bearer`.
    HeaderOnly,
    /// Also `access_token` in the query and the `herald_token` cookie (GET streams).
    Browser,
}

fn extract_token<'a>(
    headers: &'a HeaderMap,
    query: &'a [(String, String)],
    sources: TokenSources,
) -> Option<&'a str> {
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, rest) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim());
    }
    if sources == TokenSources::HeaderOnly {
        return None;
    }
    if let Some((_, t)) = query.iter().find(|(k, _)| k == "access_token") {
        return Some(t);
    }
    for v in headers.get_all(COOKIE) {
        let Ok(s) = v.to_str() else { continue };
        for kv in s.split(';') {
            if let Some(t) = kv.trim().strip_prefix("herald_token=") {
                return Some(t);
            }
        }
    }
    None
}

fn authenticate(
    app: &App,
    headers: &HeaderMap,
    query: &[(String, String)],
    sources: TokenSources,
) -> Result<Caller, ApiError> {
    let result = match extract_token(headers, query, sources) {
        None => Err(AuthError::Missing),
        Some(t) => app.verifier.verify(t),
    };
    result.map_err(|e| {
        app.metrics
            .auth_failures
            .with_label_values(&[e.reason()])
            .inc();
        ApiError::unauthorized(&e)
    })
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

/// Reads a JSON body within the size and time limits.
async fn read_json(app: &App, req: Request<RequestBody>) -> Result<Value, ApiError> {
    if !is_json(req.headers()) {
        return Err(ApiError::unsupported_media_type());
    }
    let max = app.config.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        app.metrics
            .limit_rejections
            .with_label_values(&["max_body_bytes"])
            .inc();
        return Err(ApiError::too_large(max));
    }
    let collect = Limited::new(req.into_body(), max).collect();
    let bytes: Bytes =
        match tokio::time::timeout(app.config.server.body_read_timeout, collect).await {
            Err(_) => return Err(ApiError::body_timeout()),
            Ok(Err(e)) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    app.metrics
                        .limit_rejections
                        .with_label_values(&["max_body_bytes"])
                        .inc();
                    return Err(ApiError::too_large(max));
                }
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "body_error",
                    "the request body could not be read",
                ));
            }
            Ok(Ok(c)) => c.to_bytes(),
        };
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_field("malformed_json", "body", format!("not valid JSON: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubscribeBody {
    project_id: String,
    register: Vec<RegisterBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    event: String,
    #[serde(default)]
    conditions: Option<Conditions>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Conditions {
    #[serde(default)]
    environment_slug: Option<String>,
    #[serde(default)]
    secret_path: Option<String>,
}

fn build_interest(i: usize, r: RegisterBody) -> Result<Interest, ApiError> {
    let field = |f: &str| format!("register[{i}].{f}");
    let event_type = EventType::parse(&r.event).ok_or_else(|| {
        ApiError::bad_field(
            "unknown_event",
            field("event"),
            format!(
                "unknown event {:?}; expected one of {}",
                r.event,
                EventType::accepted_names()
            ),
        )
    })?;
    let c = r.conditions.unwrap_or_default();
    let env = match c.environment_slug.as_deref() {
        None | Some("*") => None,
        Some(e) => Some(EnvSlug::parse(e).map_err(|err| {
            ApiError::bad_field(
                "invalid_environment",
                field("conditions.environmentSlug"),
                err.to_string(),
            )
        })?),
    };
    let path = match c.secret_path.as_deref() {
        None => PathPattern::everything(),
        Some(p) => PathPattern::parse_subscription(p).map_err(|err| {
            ApiError::bad_field(
                "invalid_secret_path",
                field("conditions.secretPath"),
                err.to_string(),
            )
        })?,
    };
    Ok(Interest {
        event_type,
        env,
        path,
    })
}

struct SubscribeRequest {
    project: ProjectId,
    interests: Vec<Interest>,
}

fn build_subscribe(app: &App, body: SubscribeBody) -> Result<SubscribeRequest, ApiError> {
    let project = ProjectId::parse(&body.project_id)
        .map_err(|e| ApiError::bad_field("invalid_project_id", "projectId", e.to_string()))?;
    let max = app.config.limits.max_registrations;
    if body.register.is_empty() || body.register.len() > max {
        return Err(ApiError::bad_field(
            "invalid_registrations",
            "register",
            format!(
                "between 1 and {max} registrations are accepted; found {}",
                body.register.len()
            ),
        )
        .with_details(json!({"field": "register", "limit": max})));
    }
    let mut interests: Vec<Interest> = Vec::with_capacity(body.register.len());
    let mut pattern_bytes = 0usize;
    let budget = app.config.limits.max_registration_bytes;
    for (i, r) in body.register.into_iter().enumerate() {
        let it = build_interest(i, r)?;
        // Identical registrations are one: a client can never get an event twice.
        if interests.contains(&it) {
            continue;
        }
        if !interests.iter().any(|o| o.path == it.path) {
            pattern_bytes += it.path.as_str().len();
        }
        if pattern_bytes > budget {
            return Err(ApiError::bad_field(
                "invalid_registrations",
                format!("register[{i}].conditions.secretPath"),
                format!("the registrations' secretPath patterns may hold at most {budget} bytes together"),
            )
            .with_details(json!({"field": "register", "limit": budget})));
        }
        // A registration an open stream already holds is shared, not copied.
        interests.push(app.router.shared_interest(&project, it));
    }
    Ok(SubscribeRequest { project, interests })
}

/// The GET form: `projectId`, `event` (repeatable), `environmentSlug`,
/// `secretPath`, and repeatable `register` JSON objects.
fn subscribe_from_query(query: &[(String, String)]) -> Result<SubscribeBody, ApiError> {
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let project_id = get("projectId")
        .ok_or_else(|| ApiError::bad_field("invalid_request", "projectId", "is required"))?;
    let conditions = || Conditions {
        environment_slug: get("environmentSlug"),
        secret_path: get("secretPath"),
    };
    let mut register = Vec::new();
    for (k, v) in query {
        match k.as_str() {
            "event" => register.push(RegisterBody {
                event: v.clone(),
                conditions: Some(conditions()),
            }),
            "register" => register.push(serde_json::from_str(v).map_err(|e| {
                ApiError::bad_field(
                    "invalid_request",
                    format!("register[{}]", register.len()),
                    e.to_string(),
                )
            })?),
            _ => {}
        }
    }
    Ok(SubscribeBody {
        project_id,
        register,
    })
}

fn resume_point(headers: &HeaderMap, query: &[(String, String)]) -> Option<u64> {
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            query
                .iter()
                .find(|(k, _)| k == "lastEventId")
                .map(|(_, v)| v.clone())
        })?;
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    // An id herald never issued resumes from nothing: the client gets `gap`.
    Some(raw.parse().unwrap_or(0))
}

fn sse_response(body: HttpBody) -> Response<HttpBody> {
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

/// A draining instance answers every subscribe 200 with an immediate `reconnect`.
fn reconnect_now(app: &App, reason: ReconnectReason) -> Response<HttpBody> {
    let close = Close::Reconnect {
        reason,
        retry_ms: jittered_retry_ms(app.config.stream.retry),
    };
    let frame = Dialect::Native.encode_control(&Control::Close(close), 0);
    sse_response(HttpBody::full(frame))
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

async fn subscribe(
    app: &Arc<App>,
    req: Request<RequestBody>,
) -> Result<Response<HttpBody>, ApiError> {
    if app.shutdown.is_draining() {
        app.metrics
            .subscriptions
            .with_label_values(&["draining"])
            .inc();
        return Ok(reconnect_now(app, ReconnectReason::Draining));
    }
    let count = |r: &str| app.metrics.subscriptions.with_label_values(&[r]).inc();
    let query = parse_query(&req);
    let sources = if req.method() == Method::GET {
        TokenSources::Browser
    } else {
        TokenSources::HeaderOnly
    };
    let caller =
        authenticate(app, req.headers(), &query, sources).inspect_err(|_| count("unauthorized"))?;
    if !app.rate_limiter.try_take(&caller.identity) {
        count("limited");
        app.metrics
            .limit_rejections
            .with_label_values(&["subscribe_rate"])
            .inc();
        return Err(ApiError::limited(
            crate::limits::Limit::SubscribeRate,
            "too many subscribe requests; slow down",
        ));
    }
    let resume = resume_point(req.headers(), &query);
    let abort = req.extensions().get::<Arc<ConnectionAbort>>().cloned();
    let body = if req.method() == Method::GET {
        subscribe_from_query(&query)
    } else {
        let v = read_json(app, req)
            .await
            .inspect_err(|_| count("bad_request"))?;
        serde_json::from_value::<SubscribeBody>(v)
            .map_err(|e| ApiError::bad_field("invalid_request", "body", e.to_string()))
    }
    .inspect_err(|_| count("bad_request"))?;
    let sub = build_subscribe(app, body).inspect_err(|_| count("bad_request"))?;

    let policy = app.authorizer.current();
    for (i, it) in sub.interests.iter().enumerate() {
        if !policy.may_subscribe(&caller.identity, &sub.project, it) {
            count("forbidden");
            app.metrics
                .permission_denied
                .with_label_values(&["subscribe"])
                .inc();
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{} may not subscribe to {it} in project {}",
                    caller.identity, sub.project
                ),
            )
            .with_details(json!({
                "registration": i,
                "event": it.event_type.name(),
                "environmentSlug": it.env.as_ref().map(EnvSlug::as_str),
                "secretPath": it.path.as_str(),
            })));
        }
    }
    let elsewhere = app
        .cluster
        .as_ref()
        .map(|c| c.streams_elsewhere(&caller.identity, &sub.project))
        .unwrap_or_default();
    let slot = app
        .conn_limiter
        .acquire(&caller.identity, &sub.project, elsewhere)
        .map_err(|l| {
            count("limited");
            app.metrics
                .limit_rejections
                .with_label_values(&[l.label()])
                .inc();
            let msg = match l {
                crate::limits::Limit::ConnectionsPerIdentity => format!(
                    "{} already has {} open streams on project {} (across all instances)",
                    caller.identity,
                    app.conn_limiter.value(l),
                    sub.project
                ),
                crate::limits::Limit::ConnectionsPerIdentityTotal => format!(
                    "{} already has {} open streams on all projects together (across all instances)",
                    caller.identity,
                    app.conn_limiter.value(l),
                ),
                _ => "this instance has reached its connection limit".to_owned(),
            };
            ApiError::limited(l, msg)
        })?;

    let settings = StreamSettings {
        dialect: Dialect::Native,
        queue_frames: app.config.stream.queue_frames,
        heartbeat: app.config.stream.heartbeat,
        retry: app.config.stream.retry,
        expires_in: caller.remaining(),
        close_timeout: app.config.stream.close_timeout,
    };
    let id = app.router.next_conn_id();
    let (_conn, mut stream) = new_stream(
        Subscriber {
            id,
            identity: caller.identity.clone(),
            project: sub.project,
            interests: sub.interests,
        },
        &settings,
        abort,
        app.authorizer.clone(),
        app.metrics.clone(),
    );
    stream.hold(Box::new(slot));
    if let Some(c) = &app.cluster {
        stream.hold(Box::new(crate::cluster::TouchOnDrop(c.clone())));
        c.touch();
    }
    if let Err(e) = app.bus.attach(&mut stream, resume).await {
        // Answer 200 with `reconnect`, not 503: EventSource gives up for good on non-200.
        tracing::warn!(error = %e, "cannot take interest for a new stream; telling it to reconnect");
        count("bus_unavailable");
        return Ok(reconnect_now(app, ReconnectReason::BusUnavailable));
    }
    count("accepted");
    tracing::debug!(conn = id, identity = %caller.identity, "stream opened");
    Ok(sse_response(HttpBody::Stream(Box::new(stream))))
}

async fn publish(
    app: &Arc<App>,
    req: Request<RequestBody>,
) -> Result<Response<HttpBody>, ApiError> {
    let caller = authenticate(app, req.headers(), &[], TokenSources::HeaderOnly)?;
    let body = read_json(app, req).await?;
    let (items, batch) = match body {
        Value::Array(a) => (a, true),
        v => (vec![v], false),
    };
    let max = app.config.limits.max_publish_batch;
    if items.is_empty() || items.len() > max {
        return Err(ApiError::bad_field(
            "invalid_batch",
            "body",
            format!("between 1 and {max} events are accepted per request"),
        ));
    }
    let mut events = Vec::with_capacity(items.len());
    for (i, v) in items.into_iter().enumerate() {
        let ev = Event::from_json(v, app.config.limits.max_event_bytes).map_err(|e| {
            app.metrics
                .events_rejected
                .with_label_values(&[e.reason])
                .inc();
            let field = if batch {
                format!("[{i}].{}", e.field)
            } else {
                e.field.clone()
            };
            if e.reason == "too_large" {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "event_too_large",
                    format!("{field}: {}", e.message),
                )
                .with_details(json!({"field": field, "limit": app.config.limits.max_event_bytes}));
            }
            ApiError::bad_field("invalid_event", field, e.message)
        })?;
        events.push(ev);
    }
    for (i, ev) in events.iter().enumerate() {
        if !app
            .authorizer
            .may(&caller.identity, &ev.key, Action::Publish)
        {
            app.metrics
                .permission_denied
                .with_label_values(&["publish"])
                .inc();
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{} may not publish {}", caller.identity, ev.key),
            )
            .with_details(json!({"index": i})));
        }
    }
    if !app.bus.is_ready() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            "the event bus is unavailable; retry later",
        ));
    }
    let published = app.bus.publish(events).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            e.to_string(),
        )
    })?;
    let ids: Vec<&str> = published.iter().map(|p| p.id.as_str()).collect();
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"ids": ids, "events": published}),
    ))
}
