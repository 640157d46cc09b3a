//! Configuration: one typed [`Config`], layered with figment.
//!
//! Layers, later wins: built-in defaults < `herald.toml` (or `--config FILE`,
//! which must exist) < `HERALD_*` environment variables (nested keys joined by
//! `__`, e.g. `HERALD_SERVER__LISTEN`) < command-line flags. Unknown keys and bad
//! values fail at start with the key named. Secrets are redacted by
//! [`Config::redacted`] for `herald config print`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

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
}

/// `[replay]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Keep events in a JetStream stream, so any instance can resume any client.
    pub enabled: bool,
    /// Stream name.
    pub stream: String,
    /// Oldest event kept.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Most bytes kept.
    pub max_bytes: i64,
    /// Stream replicas (3 in a 3-node cluster).
    pub replicas: usize,
    /// Publishes with the same event id within this window are stored once.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Most events replayed to one resuming stream; beyond that it gets `gap`.
    pub max_events: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            stream: "HERALD_EVENTS".into(),
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 1 << 30,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_events: 100_000,
        }
    }
}

/// `[nats]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs, e.g. `["nats://n1:4222", "nats://n2:4222"]`. Empty: embedded bus.
    pub urls: Vec<String>,
    /// Connection name shown by the server (the instance id is appended).
    pub name: String,
    /// First token(s) of every subject herald uses.
    pub prefix: String,
    /// Token authentication (secret).
    pub token: Option<String>,
    /// User for user/password authentication.
    pub user: Option<String>,
    /// Password (secret).
    pub password: Option<String>,
    /// NKey seed (secret).
    pub nkey_seed: Option<String>,
    /// `.creds` file (JWT + NKey).
    pub credentials_file: Option<PathBuf>,
    /// CA certificate(s) to trust, PEM.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate, PEM (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// Client key, PEM.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to the server without TLS.
    pub require_tls: bool,
    /// Messages buffered per NATS subscription before the client drops (a `gap`).
    pub subscription_capacity: usize,
    /// Time allowed for connecting and for a publish to reach the server.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often this instance announces itself to the others.
    #[serde(with = "humantime_serde")]
    pub presence_interval: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            name: "herald".into(),
            prefix: "herald".into(),
            token: None,
            user: None,
            password: None,
            nkey_seed: None,
            credentials_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            require_tls: false,
            subscription_capacity: 65_536,
            request_timeout: Duration::from_secs(5),
            presence_interval: Duration::from_secs(2),
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public listener (API and streams).
    pub listen: SocketAddr,
    /// Admin listener (metrics, health, admin views). Keep it private.
    pub admin_listen: SocketAddr,
    /// Time allowed for a client to send the request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time allowed for a client to send a request body.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Runtime worker threads; 0 means one per core.
    pub worker_threads: usize,
}

/// `[stream]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Interval of the comment heartbeat on idle streams.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The `retry:` hint sent first on every stream.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// Frames one connection may have queued before it is closed as a slow consumer.
    pub queue_frames: usize,
    /// Events kept in memory for `Last-Event-ID` resume (embedded bus).
    pub replay_buffer: usize,
    /// How long a stream being closed may take to write its last event before
    /// its connection is dropped (a client that stopped reading).
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest accepted event (canonical JSON), in bytes.
    pub max_event_bytes: usize,
    /// Most registrations in one subscribe request.
    pub max_registrations: usize,
    /// Most open streams of one identity on one project (cluster-wide on NATS).
    pub connections_per_identity_project: usize,
    /// Most open streams of one identity on all projects together
    /// (cluster-wide on NATS).
    pub connections_per_identity: usize,
    /// Most open streams on this instance (lowered at start to what the
    /// open-file limit leaves after `reserved_fds`).
    pub max_connections: usize,
    /// File descriptors streams never take: kept for the publish API, the
    /// admin listener, NATS and the policy files.
    pub reserved_fds: usize,
    /// Most bytes of `secretPath` patterns one subscribe may register, all
    /// registrations together (each distinct pattern counted once).
    pub max_registration_bytes: usize,
    /// Sustained subscribe requests per second per identity.
    pub subscribe_rate: f64,
    /// Subscribe requests one identity may make in a burst.
    pub subscribe_burst: f64,
    /// Most events in one publish request.
    pub max_publish_batch: usize,
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared secret for HS256/384/512 tokens (secret: redacted in `config print`).
    pub hs_secret: Option<String>,
    /// File holding the HS secret (trailing newline ignored).
    pub hs_secret_file: Option<PathBuf>,
    /// PEM public key for RS256, ES256 or EdDSA tokens.
    pub public_key_file: Option<PathBuf>,
    /// Accepted algorithms; empty means every algorithm a configured key can verify.
    pub algorithms: Vec<String>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

/// `[policy]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// casbin model file.
    pub model: PathBuf,
    /// casbin policy file.
    pub policy: PathBuf,
    /// Most cached delivery-time decisions.
    pub cache_size: usize,
    /// Reload when the files change (SIGHUP always reloads).
    pub watch: bool,
    /// How often the files are checked for changes.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

/// `[cors]`
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call the API from a browser, e.g. `https://app.example.com`.
    /// `"*"` allows any origin, but then never with credentials.
    pub allowed_origins: Vec<String>,
}

/// `[shutdown]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time between failing `/readyz` and closing streams, so a load balancer notices.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Window over which open streams are told to reconnect, spread evenly.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// Hard deadline for the whole shutdown.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8080).into(),
            admin_listen: ([127, 0, 0, 1], 9090).into(),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            worker_threads: 0,
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            queue_frames: 1024,
            replay_buffer: 10_000,
            close_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_event_bytes: 64 * 1024,
            max_registrations: 10,
            connections_per_identity_project: 5,
            connections_per_identity: 100,
            max_connections: 50_000,
            reserved_fds: 256,
            max_registration_bytes: 4096,
            subscribe_rate: 5.0,
            subscribe_burst: 20.0,
            max_publish_batch: 100,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs_secret: None,
            hs_secret_file: None,
            public_key_file: None,
            algorithms: Vec::new(),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(5),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::from("policies/model.conf"),
            policy: PathBuf::from("policies/policy.csv"),
            cache_size: 100_000,
            watch: true,
            watch_interval: Duration::from_millis(250),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(2),
            drain_window: Duration::from_secs(5),
            deadline: Duration::from_secs(15),
        }
    }
}

/// A configuration problem, naming the key (and how to set it).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Figment(Box<figment::Error>),
    #[error("invalid configuration: `{key}` (env HERALD_{env}): {message}")]
    Invalid {
        key: &'static str,
        env: String,
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        env: key.replace('.', "__").to_uppercase(),
        message: message.into(),
    }
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

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_body_bytes < 1024 {
            return Err(invalid("limits.max_body_bytes", "must be at least 1024"));
        }
        if l.max_event_bytes < 256 || l.max_event_bytes > 8 * 1024 * 1024 {
            return Err(invalid(
                "limits.max_event_bytes",
                "must be between 256 and 8388608",
            ));
        }
        if l.max_registrations == 0 || l.max_registrations > 100 {
            return Err(invalid(
                "limits.max_registrations",
                "must be between 1 and 100",
            ));
        }
        if l.connections_per_identity_project == 0 {
            return Err(invalid(
                "limits.connections_per_identity_project",
                "must be at least 1",
            ));
        }
        if l.connections_per_identity == 0 {
            return Err(invalid(
                "limits.connections_per_identity",
                "must be at least 1",
            ));
        }
        if l.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if l.reserved_fds < 16 {
            return Err(invalid("limits.reserved_fds", "must be at least 16"));
        }
        if l.max_registration_bytes < crate::path::MAX_PATH_LEN {
            return Err(invalid(
                "limits.max_registration_bytes",
                format!("must be at least {}", crate::path::MAX_PATH_LEN),
            ));
        }
        if !(l.subscribe_rate > 0.0 && l.subscribe_rate.is_finite()) {
            return Err(invalid(
                "limits.subscribe_rate",
                "must be a positive number",
            ));
        }
        if !(l.subscribe_burst >= 1.0 && l.subscribe_burst.is_finite()) {
            return Err(invalid("limits.subscribe_burst", "must be at least 1"));
        }
        if l.max_publish_batch == 0 {
            return Err(invalid("limits.max_publish_batch", "must be at least 1"));
        }
        // Every duration is added to clocks: bounded here, so no setting can
        // overflow one.
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        for (key, d) in [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("stream.heartbeat", self.stream.heartbeat),
            ("stream.retry", self.stream.retry),
            ("stream.close_timeout", self.stream.close_timeout),
            ("auth.leeway", self.auth.leeway),
            ("policy.watch_interval", self.policy.watch_interval),
            ("shutdown.grace", self.shutdown.grace),
            ("shutdown.drain_window", self.shutdown.drain_window),
            ("shutdown.deadline", self.shutdown.deadline),
            ("nats.request_timeout", self.nats.request_timeout),
            ("nats.presence_interval", self.nats.presence_interval),
            ("replay.max_age", self.replay.max_age),
            ("replay.duplicate_window", self.replay.duplicate_window),
        ] {
            if d > YEAR {
                return Err(invalid(key, "must be at most a year"));
            }
        }
        if self.auth.leeway > Duration::from_secs(600) {
            return Err(invalid("auth.leeway", "must be at most 10m"));
        }
        if self.stream.queue_frames < 2 {
            return Err(invalid("stream.queue_frames", "must be at least 2"));
        }
        if self.stream.heartbeat < Duration::from_millis(100) {
            return Err(invalid("stream.heartbeat", "must be at least 100ms"));
        }
        if self.policy.watch_interval < Duration::from_millis(10) {
            return Err(invalid("policy.watch_interval", "must be at least 10ms"));
        }
        if self.server.header_read_timeout.is_zero() {
            return Err(invalid("server.header_read_timeout", "must be positive"));
        }
        if self.server.body_read_timeout.is_zero() {
            return Err(invalid("server.body_read_timeout", "must be positive"));
        }
        let prefix_ok = !self.nats.prefix.is_empty()
            && self.nats.prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if !prefix_ok {
            return Err(invalid(
                "nats.prefix",
                "must be dot-separated tokens of A-Z a-z 0-9 _ -",
            ));
        }
        if self.nats.subscription_capacity < 64 {
            return Err(invalid("nats.subscription_capacity", "must be at least 64"));
        }
        if self.nats.presence_interval < Duration::from_millis(50) {
            return Err(invalid("nats.presence_interval", "must be at least 50ms"));
        }
        for u in &self.nats.urls {
            if !(u.starts_with("nats://")
                || u.starts_with("tls://")
                || u.starts_with("ws://")
                || u.starts_with("wss://"))
            {
                return Err(invalid(
                    "nats.urls",
                    format!("{u:?} is not a nats://, tls://, ws:// or wss:// URL"),
                ));
            }
        }
        if self.replay.enabled {
            if self.nats.urls.is_empty() {
                return Err(invalid("replay.enabled", "needs NATS: set nats.urls"));
            }
            if self.replay.stream.is_empty()
                || !self
                    .replay
                    .stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(invalid("replay.stream", "must be A-Z a-z 0-9 _ -"));
            }
            if !(1..=5).contains(&self.replay.replicas) {
                return Err(invalid("replay.replicas", "must be between 1 and 5"));
            }
            if self.replay.max_bytes < 1024 * 1024 {
                return Err(invalid("replay.max_bytes", "must be at least 1 MiB"));
            }
        }
        for a in &self.auth.algorithms {
            if crate::auth::parse_algorithm(a).is_none() {
                return Err(invalid(
                    "auth.algorithms",
                    format!("unsupported algorithm {a:?}; allowed: HS256, HS384, HS512, RS256, ES256, EdDSA"),
                ));
            }
        }
        for o in &self.cors.allowed_origins {
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

    /// The configuration as TOML with secrets redacted.
    pub fn redacted(&self) -> String {
        let mut c = self.clone();
        let redact = |v: &mut Option<String>| {
            if v.is_some() {
                *v = Some("<redacted>".to_owned());
            }
        };
        redact(&mut c.auth.hs_secret);
        redact(&mut c.nats.token);
        redact(&mut c.nats.password);
        redact(&mut c.nats.nkey_seed);
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
// figment's Jail closures return its large error type; test-only.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

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
        c.auth.hs_secret = Some("topsecret".into());
        let out = c.redacted();
        assert!(!out.contains("topsecret"));
        assert!(out.contains("<redacted>"));
    }
}
