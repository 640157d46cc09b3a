//! Configuration: one typed [`Config`], layered with figment.
//!
//! Layers, later wins: built-in defaults < `herald.toml` (or `--config FILE`,
//! which must exist) < `HERALD_*` environment variables (nested keys joined by
//! `__`, e.g. `HERALD_SERVER__LISTEN`) < command-line flags. Unknown keys and bad
//! values fail at start with the key named. Each section belongs to the
//! component it configures (`auth::AuthConfig`, `http::ServerConfig`, ...)
//! and checks itself; this module composes them and layers the sources.
//! Secrets are `setting::Secret`s, which print as `<redacted>`.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use crate::auth::AuthConfig;
pub use crate::bus::nats::NatsConfig;
pub use crate::bus::replay::ReplayConfig;
pub use crate::http::cors::CorsConfig;
pub use crate::http::ServerConfig;
pub use crate::ingest::IngestConfig;
pub use crate::limits::LimitsConfig;
pub use crate::policy::PolicyConfig;
pub use crate::remember::RememberConfig;
pub use crate::setting::Invalid;
pub use crate::shutdown::ShutdownConfig;
pub use crate::stream::StreamConfig;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners and connection timeouts.
    pub server: ServerConfig,
    /// SSE stream behaviour.
    pub stream: StreamConfig,
    /// Request and connection limits.
    pub limits: LimitsConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// casbin policy files.
    pub policy: PolicyConfig,
    /// Browser cross-origin access.
    pub cors: CorsConfig,
    /// Graceful drain on SIGTERM.
    pub shutdown: ShutdownConfig,
    /// NATS; without `urls` herald runs the embedded in-process bus.
    pub nats: NatsConfig,
    /// JetStream replay (NATS mode only).
    pub replay: ReplayConfig,
    /// Where streams without `Last-Event-ID` left off.
    pub remember: RememberConfig,
    /// Events from a stock Infisical: webhooks, its Redis bus.
    pub ingest: IngestConfig,
}

/// A configuration problem, naming the key (and how to set it).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Figment(Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Invalid),
}

impl Config {
    /// Loads the layered configuration. `file` is `--config` (must exist) or
    /// `None` for `./herald.toml` when present. `overrides` are the command-line
    /// flags as `(dotted.key, value)` pairs, applied last.
    pub fn load(
        file: Option<&Path>,
        overrides: &[(&str, figment::value::Value)],
    ) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(f) => {
                if !f.is_file() {
                    return Err(ConfigError::MissingFile(f.to_path_buf()));
                }
                fig = fig.merge(Toml::file_exact(f));
            }
            // Only ./herald.toml, never a parent folder's (which `Toml::file` would find).
            None if Path::new("herald.toml").is_file() => {
                fig = fig.merge(Toml::file_exact("herald.toml"))
            }
            None => {}
        }
        // HERALD_LOG is the log filter, read before the config exists.
        fig = fig.merge(Env::prefixed("HERALD_").ignore(&["LOG"]).split("__"));
        for (k, v) in overrides {
            fig = fig.merge((*k, v.clone()));
        }
        let cfg: Config = fig
            .extract()
            .map_err(|e| ConfigError::Figment(Box::new(e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot, section by section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.stream.validate()?;
        self.limits.validate()?;
        self.auth.validate()?;
        self.policy.validate()?;
        self.cors.validate()?;
        self.shutdown.validate()?;
        self.nats.validate()?;
        self.replay.validate(!self.nats.urls.is_empty())?;
        self.remember.validate()?;
        self.ingest
            .validate(!self.nats.urls.is_empty(), &self.replay)?;
        Ok(())
    }

    /// The configuration as TOML; every secret reads `<redacted>` (see
    /// [`crate::setting::Secret`]).
    pub fn redacted(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
// figment's Jail closures return its large error type; test-only.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;
    use std::time::Duration;

    #[test]
    fn layers_apply_in_order() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "herald.toml",
                "[server]\nlisten = \"127.0.0.1:1000\"\nadmin_listen = \"127.0.0.1:1001\"\n",
            )?;
            jail.set_env("HERALD_SERVER__ADMIN_LISTEN", "127.0.0.1:2001");
            jail.set_env("HERALD_STREAM__HEARTBEAT", "2s");
            let cfg = Config::load(None, &[("limits.max_registrations", 3.into())])
                .map_err(|e| e.to_string())?;
            assert_eq!(cfg.server.listen.port(), 1000);
            assert_eq!(cfg.server.admin_listen.port(), 2001);
            assert_eq!(cfg.stream.heartbeat, Duration::from_secs(2));
            assert_eq!(cfg.limits.max_registrations, 3);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        Jail::expect_with(|jail| {
            jail.create_file("herald.toml", "[server]\nlisten_addr = \"x\"\n")?;
            let err = Config::load(None, &[]).unwrap_err().to_string();
            assert!(err.contains("listen_addr"), "{err}");
            jail.create_file("herald.toml", "[limits]\nmax_registrations = 0\n")?;
            let err = Config::load(None, &[]).unwrap_err().to_string();
            assert!(
                err.contains("limits.max_registrations")
                    && err.contains("HERALD_LIMITS__MAX_REGISTRATIONS"),
                "{err}"
            );
            jail.create_file("herald.toml", "")?;
            jail.set_env("HERALD_STREAM__HEARTBEAT", "soon");
            let err = Config::load(None, &[]).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("stream.heartbeat"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/herald.toml")), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }

    #[test]
    fn secrets_are_redacted() {
        let mut c = Config::default();
        c.auth.hs_secret = Some(crate::setting::Secret::new("topsecret"));
        c.nats.password = Some(crate::setting::Secret::new("topsecret"));
        let out = c.redacted();
        assert!(!out.contains("topsecret"));
        assert!(out.contains("<redacted>"));
    }
}
