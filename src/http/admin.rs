//! The admin listener: metrics, health, readiness and operator views.
//!
//! Bind it to a private address: `/admin/connections` names identities.
//! Every view is a `Serialize` type, the same on every bus.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use super::error::{json_response, ApiError};
use super::{Handler, HttpBody, RequestBody};
use crate::auth::Verifier;
use crate::bus::Bus;
use crate::cluster::{Cluster, ClusterView, LocalView};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::router::Router;
use crate::shutdown::Shutdown;

/// The OpenAPI 3.1 document of the public API, served at `/openapi.yaml`.
pub const OPENAPI: &str = include_str!("openapi.yaml");

/// The admin listener's handler.
pub struct Admin {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// Open streams.
    pub router: Arc<Router>,
    /// The policy in force.
    pub authorizer: Arc<Authorizer>,
    /// The bus (readiness, NATS view).
    pub bus: Arc<Bus>,
    /// Other instances, on NATS.
    pub cluster: Option<Arc<Cluster>>,
    /// This instance.
    pub local: Arc<LocalView>,
    /// The lifecycle (draining fails readiness).
    pub shutdown: Shutdown,
    /// Token verification (stale key sets fail readiness).
    pub verifier: Arc<Verifier>,
    /// Ingest sources, when any is configured.
    pub ingest: Option<Arc<crate::ingest::Ingest>>,
}

/// One open stream in `/admin/connections`.
#[derive(Serialize)]
struct StreamView<'a> {
    id: u64,
    identity: &'a str,
    /// Roles the token's claims gave it.
    roles: Vec<&'a str>,
    project: &'a str,
    dialect: &'static str,
    registrations: &'a [Interest],
    opened_at: String,
    queue_depth: usize,
    closing: bool,
}

impl Handler for Admin {
    async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        _peer: SocketAddr,
    ) -> Response<HttpBody> {
        if let Err(e) = super::check_host(&req) {
            return e.into_response();
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return ApiError::method_not_allowed("GET, HEAD").into_response();
        }
        match req.uri().path() {
            "/metrics" => {
                let mut resp = Response::new(HttpBody::full(self.metrics.render()));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
            "/openapi.yaml" => {
                let mut resp = Response::new(HttpBody::full(OPENAPI));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/yaml"));
                resp
            }
            "/readyz" => self.readyz(),
            "/admin/connections" => self.connections(),
            "/admin/policy" => json_response(StatusCode::OK, &json!(self.authorizer.status())),
            "/admin/cluster" => {
                let me = self.local.presence();
                let view = match &self.cluster {
                    Some(c) => c.view(&me),
                    None => ClusterView::alone(&me, "embedded"),
                };
                json_response(StatusCode::OK, &json!(view))
            }
            "/admin/nats" => match &*self.bus {
                Bus::Nats(b) => json_response(
                    StatusCode::OK,
                    &json!({"connected": b.is_connected(), "server_version": b.server_version(),
                            "subscriptions": b.subscribed_subjects()}),
                ),
                Bus::Embedded(_) => ApiError::not_found().into_response(),
            },
            "/admin/ingest" => match &self.ingest {
                Some(i) => json_response(StatusCode::OK, &i.view()),
                None => json_response(StatusCode::OK, &json!({"sources": []})),
            },
            _ => ApiError::not_found().into_response(),
        }
    }
}

impl Admin {
    fn readyz(&self) -> Response<HttpBody> {
        let draining = self.shutdown.is_draining();
        let bus = self.bus.is_ready();
        let keys = self.verifier.key_sets_fresh();
        let ready = bus && keys && !draining;
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(
            status,
            &json!({"ready": ready, "checks": {"bus": bus, "policy": true, "key_sets": keys, "draining": draining}}),
        )
    }

    fn connections(&self) -> Response<HttpBody> {
        let streams = self.router.connections();
        let views: Vec<StreamView<'_>> = streams
            .iter()
            .map(|c| StreamView {
                id: c.id,
                identity: c.identity.identity(),
                roles: c.identity.claimed_roles().collect(),
                project: c.project.as_str(),
                dialect: c.dialect.name(),
                registrations: &c.interests,
                opened_at: crate::event::rfc3339(c.opened_at),
                queue_depth: c.queue_depth(),
                closing: c.is_closing(),
            })
            .collect();
        json_response(
            StatusCode::OK,
            &json!({"count": views.len(), "connections": views}),
        )
    }
}
