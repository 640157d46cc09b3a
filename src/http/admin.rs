//! The admin listener: metrics, health, readiness and operator views.
//!
//! Bind it to a private address: `/admin/connections` names identities.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::error::{json_response, ApiError};
use super::{Handler, HttpBody, RequestBody};
use crate::app::App;

/// The admin listener's handler.
pub struct Admin(pub Arc<App>);

impl Handler for Admin {
    async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        _peer: SocketAddr,
    ) -> Response<HttpBody> {
        let app = &self.0;
        if let Err(e) = super::check_host(&req) {
            return e.into_response();
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return ApiError::method_not_allowed("GET, HEAD").into_response();
        }
        match req.uri().path() {
            "/metrics" => {
                let mut resp = Response::new(HttpBody::full(app.metrics.render()));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" => {
                let draining = app.shutdown.is_draining();
                let bus = app.bus.is_ready();
                let ready = bus && !draining;
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_response(
                    status,
                    &json!({"ready": ready, "checks": {"bus": bus, "policy": true, "draining": draining}}),
                )
            }
            "/admin/connections" => {
                let conns: Vec<_> = app
                    .router
                    .connections()
                    .iter()
                    .map(|c| {
                        json!({
                            "id": c.id,
                            "identity": c.identity.as_str(),
                            "project": c.project.as_str(),
                            "registrations": c.interests.iter().map(|i| json!({
                                "event": i.event_type.name(),
                                "environmentSlug": i.env.as_ref().map(|e| e.as_str()),
                                "secretPath": i.path.as_str(),
                            })).collect::<Vec<_>>(),
                            "opened_at": time::OffsetDateTime::from(c.opened_at)
                                .format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                            "queue_depth": c.queue_depth(),
                            "closing": c.is_closing(),
                        })
                    })
                    .collect();
                json_response(
                    StatusCode::OK,
                    &json!({"count": conns.len(), "connections": conns}),
                )
            }
            "/admin/policy" => json_response(StatusCode::OK, &json!(app.authorizer.status())),
            "/admin/cluster" => {
                let me = app.presence();
                let body = match &app.cluster {
                    Some(c) => c.view(&me),
                    None => json!({"instance": me.id, "instances": [{"id": me.id, "self": true,
                        "connections": me.connections, "policy_generation": me.policy_generation,
                        "policy_fingerprint": me.policy_fingerprint}],
                        "distinct_policy_fingerprints": 1, "policy_drift": false, "bus": "embedded"}),
                };
                json_response(StatusCode::OK, &body)
            }
            "/admin/nats" => match &*app.bus {
                crate::bus::Bus::Nats(b) => json_response(
                    StatusCode::OK,
                    &json!({"connected": b.is_connected(), "server_version": b.server_version(),
                            "subscriptions": b.subscribed_subjects()}),
                ),
                _ => ApiError::not_found().into_response(),
            },
            _ => ApiError::not_found().into_response(),
        }
    }
}
