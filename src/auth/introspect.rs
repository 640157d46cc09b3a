//! Asking the token's provider whether it still stands (optional, per issuer).
//!
//! Two ways to ask: RFC 7662 token introspection (a form POST answered by
//! `{"active": true|false}`), or a GET of a URL with the bearer token, where
//! 2xx means valid and 401/403 revoked, like nginx's `auth_request`. Answers
//! are cached by the token's SHA-256 for `cache_ttl` (inactive ones for
//! `negative_ttl`); at most `max_concurrent` requests run at once, each
//! within `timeout`. When the provider cannot answer, `on_failure` decides:
//! `refuse`, or `use_cached` (the last answer, up to `max_stale` old).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use super::fetch::{FetchError, Fetcher};
use crate::metrics::Metrics;
use crate::setting::{self, invalid, Invalid, Secret};

/// How to ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// RFC 7662: POST `token=…`, read `active`.
    Rfc7662,
    /// GET with `Authorization: Bearer <token>`: 2xx valid, 401/403 not.
    Bearer,
}

/// What a request gets when the provider cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Refused (and a live stream is closed).
    Refuse,
    /// The cached answer, if not older than `max_stale`.
    UseCached,
}

/// `[auth.introspection]` (or in an `[[auth.issuers]]` block).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// Where to ask.
    pub url: String,
    /// How to ask.
    #[serde(default = "default_method")]
    pub method: Method,
    /// RFC 7662 client credentials (HTTP Basic), if the provider wants them.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Their secret (redacted in `config print`).
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// How long an active answer is kept (and how often live streams are re-checked).
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long an inactive answer is kept.
    #[serde(default = "default_negative_ttl", with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Each request's time-out.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Most requests at once.
    #[serde(default = "default_concurrent")]
    pub max_concurrent: usize,
    /// What a request gets when the provider cannot answer.
    #[serde(default = "default_on_failure")]
    pub on_failure: OnFailure,
    /// The oldest cached answer `use_cached` serves.
    #[serde(default = "default_max_stale", with = "humantime_serde")]
    pub max_stale: Duration,
}

fn default_method() -> Method {
    Method::Rfc7662
}
fn default_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_concurrent() -> usize {
    16
}
fn default_on_failure() -> OnFailure {
    OnFailure::Refuse
}
fn default_max_stale() -> Duration {
    Duration::from_secs(300)
}

impl IntrospectionConfig {
    /// Checks what serde cannot; returns the URL.
    pub fn validate(&self) -> Result<Url, Invalid> {
        const KEY: &str = "auth.introspection.url";
        let url = Url::parse(&self.url).map_err(|e| invalid(KEY, format!("not a URL: {e}")))?;
        super::fetch::check_url(&url).map_err(|why| invalid(KEY, why))?;
        let d = |k, v, min| setting::duration(k, v, min, Duration::from_secs(24 * 3600));
        d(
            "auth.introspection.cache_ttl",
            self.cache_ttl,
            Duration::from_secs(1),
        )?;
        // At least a second: a revoked token must not cost a request each time.
        d(
            "auth.introspection.negative_ttl",
            self.negative_ttl,
            Duration::from_secs(1),
        )?;
        d(
            "auth.introspection.timeout",
            self.timeout,
            Duration::from_millis(50),
        )?;
        d(
            "auth.introspection.max_stale",
            self.max_stale,
            Duration::ZERO,
        )?;
        if self.on_failure == OnFailure::UseCached && self.max_stale < self.cache_ttl {
            return Err(invalid(
                "auth.introspection.max_stale",
                "use_cached needs max_stale of at least cache_ttl (an answer is cached that long)",
            ));
        }
        if !(1..=1024).contains(&self.max_concurrent) {
            return Err(invalid(
                "auth.introspection.max_concurrent",
                "must be 1 to 1024",
            ));
        }
        if self.client_secret.is_some() != self.client_id.is_some() {
            return Err(invalid(
                "auth.introspection.client_id",
                "client_id and client_secret go together",
            ));
        }
        if self.method == Method::Bearer && self.client_id.is_some() {
            return Err(invalid(
                "auth.introspection.client_id",
                "the bearer method sends the token itself; client credentials are for rfc7662",
            ));
        }
        Ok(url)
    }
}

/// Most cached answers; beyond it, expired ones are swept, then nothing new
/// is cached until room is made (answers are still given).
const MAX_CACHED: usize = 100_000;

#[derive(Default)]
struct Cache {
    answers: HashMap<[u8; 32], Answer>,
    /// When a full cache was last swept (at most once a second).
    swept: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Answer {
    active: bool,
    at: Instant,
}

/// The provider could not say.
#[derive(Debug, thiserror::Error)]
#[error("the token's provider cannot be asked: {0}")]
pub struct Unavailable(pub String);

/// Asks one issuer's provider.
pub struct Introspector {
    label: String,
    url: Url,
    cfg: IntrospectionConfig,
    fetcher: Fetcher,
    cache: Mutex<Cache>,
    slots: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Introspector")
            .field("issuer", &self.label)
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

impl Introspector {
    /// For issuer `label`.
    pub fn new(
        label: String,
        url: Url,
        cfg: IntrospectionConfig,
        fetcher: Fetcher,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            label,
            url,
            slots: tokio::sync::Semaphore::new(cfg.max_concurrent),
            cfg,
            fetcher,
            cache: Mutex::new(Cache::default()),
            metrics,
        }
    }

    /// How often live streams are re-checked.
    pub fn recheck_every(&self) -> Duration {
        self.cfg.cache_ttl
    }

    /// How long a live stream runs on without a good answer.
    pub fn max_stale(&self) -> Duration {
        self.cfg.max_stale
    }

    fn count(&self, result: &str) {
        self.metrics
            .introspections
            .with_label_values(&[&self.label, result])
            .inc();
    }

    /// Whether `token` is active: from the cache while fresh, else from the
    /// provider, else as `on_failure` says.
    pub async fn is_active(&self, token: &str) -> Result<bool, Unavailable> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.cache.lock().answers.get(&key).copied();
        if let Some(a) = cached {
            let ttl = if a.active {
                self.cfg.cache_ttl
            } else {
                self.cfg.negative_ttl
            };
            if a.at.elapsed() < ttl {
                self.count("cached");
                return Ok(a.active);
            }
        }
        match self.ask(token).await {
            Ok(active) => {
                self.count(if active { "active" } else { "inactive" });
                self.remember(key, active);
                Ok(active)
            }
            Err(e) => {
                tracing::warn!(issuer = %self.label, error = %e, "token introspection failed");
                match (self.cfg.on_failure, cached) {
                    (OnFailure::UseCached, Some(a)) if a.at.elapsed() <= self.cfg.max_stale => {
                        self.count("stale");
                        Ok(a.active)
                    }
                    _ => {
                        self.count("unavailable");
                        Err(Unavailable(e.to_string()))
                    }
                }
            }
        }
    }

    fn remember(&self, key: [u8; 32], active: bool) {
        let mut cache = self.cache.lock();
        if cache.answers.len() >= MAX_CACHED && !cache.answers.contains_key(&key) {
            // Full: sweep what aged out, at most once a second (the sweep
            // walks the whole cache); still full, start again empty.
            if cache
                .swept
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            {
                return;
            }
            cache.swept = Some(Instant::now());
            let keep = self.cfg.cache_ttl.max(self.cfg.max_stale);
            cache.answers.retain(|_, a| a.at.elapsed() < keep);
            if cache.answers.len() >= MAX_CACHED {
                cache.answers.clear();
            }
        }
        cache.answers.insert(
            key,
            Answer {
                active,
                at: Instant::now(),
            },
        );
    }

    /// Asks the provider, within one `timeout` for the slot and the request.
    async fn ask(&self, token: &str) -> Result<bool, FetchError> {
        tokio::time::timeout(self.cfg.timeout, self.ask_now(token))
            .await
            .unwrap_or_else(|_| Err(FetchError::Http("no answer within the time-out".into())))
    }

    async fn ask_now(&self, token: &str) -> Result<bool, FetchError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| FetchError::Http("closed".into()))?;
        let client = self.fetcher.client();
        match self.cfg.method {
            Method::Rfc7662 => {
                let mut req = client
                    .post(self.url.clone())
                    .timeout(self.cfg.timeout)
                    .header("accept", "application/json")
                    .form(&[("token", token), ("token_type_hint", "access_token")]);
                if let (Some(id), Some(secret)) = (&self.cfg.client_id, &self.cfg.client_secret) {
                    req = req.basic_auth(id, Some(secret.expose()));
                }
                let body = self.fetcher.send(req).await?;
                let doc: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|_| FetchError::Http("the answer is not JSON".into()))?;
                match doc.get("active") {
                    Some(serde_json::Value::Bool(b)) => Ok(*b),
                    _ => Err(FetchError::Http(
                        "the answer has no boolean \"active\"".into(),
                    )),
                }
            }
            Method::Bearer => {
                let req = client
                    .get(self.url.clone())
                    .timeout(self.cfg.timeout)
                    .bearer_auth(token);
                match self.fetcher.send(req).await {
                    Ok(_) => Ok(true),
                    Err(FetchError::Status(401 | 403)) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}
