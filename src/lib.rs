//! herald: real-time secret events over Server-Sent Events.
//!
//! Clients subscribe to events (`secret:created`, `secret:updated`, ...) of a
//! project, filtered by environment and secret path; producers publish them;
//! casbin policies decide who sees what, at subscribe time and again for every
//! event delivered.
//!
//! # Layout
//!
//! Domain values, checked once at the edge (nothing past it holds an
//! unchecked value):
//! - [`ident`] (project ids, environment slugs, the [`ident::Principal`]
//!   a token names, never a role), [`path`] (secret paths and linear-time
//!   patterns), [`event`] (the event-type table, the CloudEvents envelope,
//!   [`event::EventKey`]), [`interest`] (one registration), [`request`] (a
//!   subscribe request, with the field of every refusal).
//!
//! The stream, from an event to bytes:
//! - [`delivery`]: an accepted event, numbered, encoded once per dialect.
//! - [`protocol`]: every byte a client sees: the dialects, the typed
//!   control events, heartbeats.
//! - [`stream`]: one client's bounded queue and the state machine that
//!   drains it, independent of the transport.
//! - [`router`]: which open streams want an event and may see it.
//! - [`bus`]: where events enter (the embedded ring, or NATS with JetStream
//!   replay); one resume routine for both; [`subject`] is the NATS subject
//!   scheme.
//!
//! The use cases, which know nothing of HTTP:
//! - [`subscribe`]: who may open which stream, and opening it.
//! - [`publish`]: validating, permitting and publishing events.
//! - [`auth`] (tokens in, a caller out), [`policy`] (casbin, the decision
//!   cache, live reloads), [`limits`] and [`rlimit`] (stream slots, the
//!   subscribe rate, the open-file reserve), [`cluster`] (instances seen
//!   over NATS).
//!
//! Around them:
//! - [`http`]: the listeners, the direct HTTP/1 stream writer, the routes,
//!   and the one mapping from errors to responses.
//! - [`metrics`]: Prometheus series. [`shutdown`]: the phases and the drain.
//! - [`setting`] (what config sections share), [`config`] (composes the
//!   sections each component owns, and layers them), [`app`] (wiring),
//!   [`cli`] (the command line).
//!
//! # The hot path
//!
//! publish -> [`event::Event`] validated once -> the bus numbers it
//! ([`delivery::Delivery`]) -> [`router::Router::dispatch`] matches the
//! registration groups with no lock held, asks the cached permission check,
//! and pushes the same delivery into each stream's bounded queue ->
//! [`stream::SseStream`] yields it -> the writer takes its bytes, encoded
//! once per dialect for every stream ([`delivery::Delivery::encoded`]).

pub mod app;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod event;
pub mod http;
pub mod ident;
pub mod ingest;
pub mod interest;
pub mod limits;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod protocol;
pub mod publish;
pub mod remember;
pub mod request;
pub mod rlimit;
pub mod router;
pub mod setting;
pub mod shutdown;
pub mod stream;
pub mod subject;
pub mod subscribe;
