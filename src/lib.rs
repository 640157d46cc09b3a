//! herald: real-time secret events over Server-Sent Events.
//!
//! Clients subscribe to events (`secret:created`, `secret:updated`, ...) of a
//! project, filtered by environment and secret path; producers publish them;
//! casbin policies decide who sees what, at subscribe time and again for every
//! event delivered.
//!
//! # Layout
//!
//! - [`config`]: the typed, layered configuration (figment).
//! - [`ident`], [`path`], [`event`], [`interest`]: checked domain types; nothing
//!   past the HTTP edge holds an unchecked value.
//! - [`subject`]: the NATS subject scheme, both ways.
//! - [`auth`]: bearer tokens (JWT) in, identities out.
//! - [`policy`]: casbin policies, herald's match functions, the decision cache.
//! - [`bus`]: the seam events enter through: the embedded in-process bus with
//!   its replay ring, or NATS with interest-based subscriptions.
//! - [`router`]: which open streams want an event, and may see it.
//! - [`stream`], [`sse`]: one client's bounded queue and SSE framing.
//! - [`cluster`]: instances that see each other over NATS (presence, drift,
//!   cluster-wide limits).
//! - [`limits`], [`rlimit`]: connection and rate limits, and the share of
//!   the open-file limit streams may take.
//! - [`http`]: listeners, the public API, the admin API, error mapping.
//! - [`metrics`]: Prometheus series.
//! - [`shutdown`]: the drain signal every task follows.
//! - [`app`], [`cli`]: wiring and the command line.
//!
//! # The hot path
//!
//! publish -> [`event::Event`] validated once -> bus numbers it and encodes the
//! SSE frame once ([`bytes::Bytes`]) -> [`router::Router::dispatch`] matches
//! registrations, asks the cached permission check, and pushes the same bytes
//! into each connection's bounded queue -> [`stream::SseStream`] writes them.

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
pub mod interest;
pub mod limits;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod protocol;
pub mod publish;
pub mod request;
pub mod rlimit;
pub mod router;
pub mod setting;
pub mod shutdown;
pub mod stream;
pub mod subject;
pub mod subscribe;
