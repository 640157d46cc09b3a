//! What every configuration section shares: the error that names a key and
//! the environment variable that sets it, a secret that never prints, and
//! the bounds on durations.
//!
//! Each component owns its section type (`auth::AuthConfig`,
//! `http::ServerConfig`, `bus::nats::NatsConfig`, ...), checks it with the
//! helpers here, and parses it into typed values once; `config` only
//! composes the sections and layers them.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value a section refuses, naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` (env HERALD_{env}): {message}")]
pub struct Invalid {
    /// The dotted key, e.g. `limits.max_connections`.
    pub key: &'static str,
    /// The environment variable that sets it, without `HERALD_`.
    pub env: String,
    /// What is wrong.
    pub message: String,
}

/// `key` has a bad value.
pub fn invalid(key: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        key,
        env: key.replace('.', "__").to_uppercase(),
        message: message.into(),
    }
}

/// Every duration is added to clocks: a year is far above any sensible
/// setting and far below an overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Refuses a duration outside `min..=max`.
pub fn duration(
    key: &'static str,
    d: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), Invalid> {
    if d < min {
        return Err(invalid(
            key,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    if d > max {
        return Err(invalid(
            key,
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(())
}

/// Refuses a number below `min`.
pub fn at_least(key: &'static str, n: usize, min: usize) -> Result<(), Invalid> {
    if n < min {
        return Err(invalid(key, format!("must be at least {min}")));
    }
    Ok(())
}

/// A configured secret (a shared key, a password). It reads from config like
/// a string, but prints and serializes as `<redacted>`, so that `herald
/// config print`, a `Debug` log or an error can never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret from its text.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("topsecret");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        let back: Secret = serde_json::from_str("\"x\"").unwrap();
        assert_eq!(back.expose(), "x");
    }

    #[test]
    fn errors_name_the_key_and_variable() {
        let e = invalid("limits.max_connections", "must be at least 1");
        assert_eq!(
            e.to_string(),
            "`limits.max_connections` (env HERALD_LIMITS__MAX_CONNECTIONS): must be at least 1"
        );
        assert!(duration(
            "a.b",
            Duration::from_secs(2),
            Duration::from_secs(3),
            MAX_DURATION
        )
        .is_err());
        assert!(duration("a.b", Duration::MAX, Duration::ZERO, MAX_DURATION).is_err());
    }
}
