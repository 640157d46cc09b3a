//! Key sets that change: a JWKS file, a JWKS URL, or the `jwks_uri` of an
//! issuer's OpenID configuration.
//!
//! A set is read at start and again every `refresh_interval`, and once more
//! when a token names a `kid` the set does not hold, at most once per
//! `min_refresh_interval` (a flood of made-up `kid`s costs the provider one
//! request per interval, not one per token). Concurrent refreshes are one.
//! A refresh that fails keeps the last good set serving; the set counts as
//! ready until it is older than `max_key_age`. No location is ever taken
//! from a token: the configured URL, or the configured issuer's discovery
//! document, compared exactly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use url::Url;

use super::fetch::{self, Fetcher};
use super::keys::{self, Key};
use crate::metrics::Metrics;

/// Where a set comes from.
#[derive(Clone, Debug)]
pub enum Location {
    /// A JWKS file (re-read on every refresh).
    File(PathBuf),
    /// A JWKS URL.
    Url(Url),
    /// The `jwks_uri` of `{issuer}/.well-known/openid-configuration`.
    Discovery {
        /// The issuer, exactly as tokens name it.
        issuer: String,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Url(u) => write!(f, "{u}"),
            Location::Discovery { issuer } => write!(f, "discovery of {issuer}"),
        }
    }
}

/// How a set is kept fresh.
#[derive(Clone, Copy, Debug)]
pub struct Freshness {
    /// Scheduled refreshes.
    pub refresh_interval: Duration,
    /// The least time between two refreshes asked for by unknown `kid`s.
    pub min_refresh_interval: Duration,
    /// The set stops counting as ready once older than this.
    pub max_key_age: Duration,
}

/// Why a refresh is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// On the interval (or the first load).
    Scheduled,
    /// A token named a `kid` the set does not hold.
    UnknownKid,
}

struct State {
    keys: Arc<[Key]>,
    loaded_at: Option<Instant>,
    last_attempt: Option<Instant>,
    /// Refreshes started; the one running, if any, is this number.
    started: u64,
    running: bool,
    /// The `jwks_uri` discovery found, until a fetch from it fails.
    discovered: Option<Url>,
}

/// A key set that is refreshed.
pub struct KeySource {
    /// The issuer, for logs and metric labels.
    label: String,
    location: Location,
    fetcher: Fetcher,
    freshness: Freshness,
    /// The longest a caller waits for a refresh (discovery makes two requests).
    wait_limit: Duration,
    state: RwLock<State>,
    /// The number of the last refresh that finished, and whether it loaded.
    finished: tokio::sync::watch::Sender<(u64, bool)>,
    metrics: Arc<Metrics>,
}

impl KeySource {
    /// A source that holds no key until its first refresh; each fetch takes
    /// at most `fetch_timeout`.
    pub fn new(
        label: String,
        location: Location,
        fetcher: Fetcher,
        freshness: Freshness,
        fetch_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            label,
            location,
            fetcher,
            freshness,
            wait_limit: fetch_timeout * 2 + Duration::from_secs(1),
            state: RwLock::new(State {
                keys: Arc::from(Vec::new()),
                loaded_at: None,
                last_attempt: None,
                started: 0,
                running: false,
                discovered: None,
            }),
            finished: tokio::sync::watch::channel((0, false)).0,
            metrics,
        }
    }

    /// The keys in force.
    pub fn keys(&self) -> Arc<[Key]> {
        self.state.read().keys.clone()
    }

    /// Whether a set was ever loaded.
    pub fn has_loaded(&self) -> bool {
        self.state.read().loaded_at.is_some()
    }

    /// Whether a set was loaded and is younger than `max_key_age`.
    pub fn is_fresh(&self) -> bool {
        self.state
            .read()
            .loaded_at
            .is_some_and(|t| t.elapsed() <= self.freshness.max_key_age)
    }

    /// Refreshes the set and waits (at most `2 x fetch_timeout + 1 s`) for
    /// it; returns whether a refresh ran and loaded. A refresh already
    /// running is joined, not repeated. For an unknown `kid`, a refresh
    /// started less than `min_refresh_interval` ago (or running) is not
    /// started again. The refresh runs in a task of its own: a caller that
    /// goes away does not cancel it.
    pub async fn refresh(self: &Arc<Self>, why: Why) -> bool {
        let mut finished = self.finished.subscribe();
        let number = {
            let mut s = self.state.write();
            if s.running {
                s.started
            } else {
                let recent = s
                    .last_attempt
                    .is_some_and(|t| t.elapsed() < self.freshness.min_refresh_interval);
                if why == Why::UnknownKid && recent {
                    drop(s);
                    self.count("rate_limited");
                    return false;
                }
                s.running = true;
                s.started += 1;
                s.last_attempt = Some(Instant::now());
                let number = s.started;
                let me = self.clone();
                tokio::spawn(async move {
                    let loaded = me.load_and_keep(why).await;
                    me.state.write().running = false;
                    me.finished.send_replace((number, loaded));
                });
                number
            }
        };
        let done = tokio::time::timeout(self.wait_limit, finished.wait_for(|(n, _)| *n >= number))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|r| r.1);
        done.unwrap_or(false)
    }

    async fn load_and_keep(&self, why: Why) -> bool {
        match self.load().await {
            Ok(set) => {
                for skipped in &set.skipped {
                    tracing::warn!(issuer = %self.label, source = %self.location, "key skipped: {skipped}");
                }
                let n = set.keys.len();
                {
                    let mut s = self.state.write();
                    s.keys = Arc::from(set.keys);
                    s.loaded_at = Some(Instant::now());
                }
                self.metrics
                    .key_set_keys
                    .with_label_values(&[&self.label])
                    .set(n as i64);
                self.metrics
                    .key_set_updated
                    .with_label_values(&[&self.label])
                    .set(crate::auth::unix_now() as i64);
                self.count("ok");
                tracing::debug!(issuer = %self.label, keys = n, ?why, "key set loaded");
                true
            }
            Err(e) => {
                self.count("failed");
                tracing::warn!(issuer = %self.label, source = %self.location, error = %e,
                    "key set refresh failed; the last good set keeps serving");
                false
            }
        }
    }

    fn count(&self, result: &str) {
        self.metrics
            .key_set_refreshes
            .with_label_values(&[&self.label, result])
            .inc();
    }

    async fn load(&self) -> Result<keys::ParsedSet, fetch::FetchError> {
        let bytes = match &self.location {
            Location::File(p) => self.fetcher.file(p).await?,
            Location::Url(u) => self.fetcher.get(u).await?,
            Location::Discovery { issuer } => {
                let known = self.state.read().discovered.clone();
                let uri = match known {
                    Some(u) => u,
                    None => {
                        let u = self.fetcher.discover(issuer).await?;
                        self.state.write().discovered = Some(u.clone());
                        u
                    }
                };
                match self.fetcher.get(&uri).await {
                    Ok(b) => b,
                    Err(e) => {
                        // Discover again next time: the provider may have moved it.
                        self.state.write().discovered = None;
                        return Err(e);
                    }
                }
            }
        };
        keys::parse_set(&bytes).map_err(fetch::FetchError::Set)
    }

    /// Loads the set, then refreshes it on the interval (jittered by up to
    /// a tenth, so that instances do not ask together) until `stopped`.
    /// After a failure, retries back off from 1 s to the interval.
    pub async fn run(self: Arc<Self>, stopped: impl std::future::Future<Output = ()>) {
        tokio::pin!(stopped);
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = if self.refresh(Why::Scheduled).await {
                backoff = Duration::from_secs(1);
                let every = self.freshness.refresh_interval;
                let tenth = u64::try_from(every.as_millis() / 10)
                    .unwrap_or(u64::MAX)
                    .max(1);
                every
                    - Duration::from_millis(rand::Rng::gen_range(&mut rand::thread_rng(), 0..tenth))
            } else {
                let w = backoff;
                backoff = (backoff * 2).min(self.freshness.refresh_interval);
                w
            };
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::DecodingKey;

    fn set_of(kids: &[&str]) -> String {
        let pem = include_bytes!("../../tests/fixtures/rsa_public.pem");
        let key = DecodingKey::from_rsa_pem(pem).unwrap();
        let keys: Vec<_> = kids
            .iter()
            .map(|kid| {
                let mut v =
                    serde_json::to_value(Jwk::from_decoding_key(&key, None).unwrap()).unwrap();
                v["kid"] = (*kid).into();
                v
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    #[tokio::test]
    async fn a_file_set_is_reread_and_a_broken_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, set_of(&["a"])).unwrap();
        let fetcher = Fetcher::new(Duration::from_secs(1), 1 << 20, None).unwrap();
        let src = KeySource::new(
            "test".into(),
            Location::File(path.clone()),
            fetcher,
            Freshness {
                refresh_interval: Duration::from_secs(60),
                min_refresh_interval: Duration::from_secs(60),
                max_key_age: Duration::from_secs(3600),
            },
            Duration::from_secs(1),
            Arc::new(Metrics::new()),
        );
        let src = Arc::new(src);
        assert!(!src.is_fresh(), "nothing loaded yet");
        assert!(src.refresh(Why::Scheduled).await);
        let kids = |s: &KeySource| -> Vec<String> {
            s.keys().iter().filter_map(|k| k.kid.clone()).collect()
        };
        assert_eq!(kids(&src), ["a"]);
        assert!(src.is_fresh());

        std::fs::write(&path, set_of(&["b", "c"])).unwrap();
        assert!(src.refresh(Why::Scheduled).await);
        assert_eq!(kids(&src), ["b", "c"]);

        // An unknown kid right after a refresh is rate-limited: no read.
        std::fs::write(&path, set_of(&["d"])).unwrap();
        assert!(!src.refresh(Why::UnknownKid).await);
        assert_eq!(kids(&src), ["b", "c"]);

        // A broken file keeps the last good set.
        std::fs::write(&path, "{not json").unwrap();
        assert!(!src.refresh(Why::Scheduled).await);
        assert_eq!(kids(&src), ["b", "c"]);
        std::fs::write(&path, vec![b' '; (1 << 20) + 1]).unwrap();
        assert!(!src.refresh(Why::Scheduled).await);
        assert_eq!(kids(&src), ["b", "c"], "an oversized file is refused");
    }
}
