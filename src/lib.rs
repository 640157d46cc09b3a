//! herald: real-time secret events over Server-Sent Events.
pub mod auth;
pub mod config;
pub mod event;
pub mod ident;
pub mod interest;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod subject;
