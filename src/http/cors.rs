//! Cross-origin access for browsers: the configured origins, parsed once.
//!
//! An origin on the list is answered with itself and credentials allowed;
//! `*` on the list answers any other origin with `*` and never with
//! credentials; no list, no CORS headers at all.

use std::collections::HashSet;

use crate::setting::{invalid, Invalid};
use http::header::{self, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

/// The CORS answer of the public listener.
#[derive(Clone, Debug, Default)]
pub struct Cors {
    listed: HashSet<String>,
    any: bool,
}

impl Cors {
    /// From `cors.allowed_origins` (checked at config load).
    pub fn new(allowed: &[String]) -> Self {
        Self {
            listed: allowed.iter().filter(|o| *o != "*").cloned().collect(),
            any: allowed.iter().any(|o| o == "*"),
        }
    }

    fn enabled(&self) -> bool {
        self.any || !self.listed.is_empty()
    }

    /// Adds the CORS headers for a request from `origin`.
    pub fn decorate(&self, origin: Option<&HeaderValue>, h: &mut HeaderMap) {
        if !self.enabled() {
            return;
        }
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = origin else { return };
        if origin.to_str().is_ok_and(|o| self.listed.contains(o)) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        } else if self.any {
            // A wildcard never goes with credentials.
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
    }

    /// The preflight answer's headers for a route allowing `methods`.
    pub fn preflight(&self, methods: &'static str, h: &mut HeaderMap) {
        if !self.enabled() {
            return;
        }
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, last-event-id"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
}
/// `[cors]`
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call the API from a browser, e.g. `https://app.example.com`.
    /// `"*"` allows any origin, but then never with credentials.
    pub allowed_origins: Vec<String>,
}

impl CorsConfig {
    /// Every entry is `*` or an origin (`scheme://host[:port]`, no path).
    pub fn validate(&self) -> Result<(), Invalid> {
        for o in &self.allowed_origins {
            if o != "*"
                && url::Url::parse(o)
                    .map(|u| u.origin().ascii_serialization() != *o)
                    .unwrap_or(true)
            {
                return Err(invalid(
                    "cors.allowed_origins",
                    format!("{o:?} is not an origin like https://app.example.com (scheme://host[:port], no path)"),
                ));
            }
        }
        Ok(())
    }
}
