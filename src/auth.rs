//! Bearer tokens: JWT verification (and minting for operators and dev mode).
//!
//! A token's `iss` picks its issuer block (`[auth]` alone, or one of
//! `[[auth.issuers]]`), and only that block's keys are tried: keys are looked
//! up by (issuer, `kid`), never by `kid` alone, and nothing in a token names
//! where a key comes from. Only the algorithms of an allow-list are accepted
//! (HS256/384/512, RS256, ES256, EdDSA; never `none`), and each algorithm is
//! verified only with a key of its own family, so an HS secret can never
//! verify an RS token or the reverse. Every claim is checked with the type
//! RFC 7519 gives it (a string `nbf` is refused, not ignored). The mapped
//! identity claim is the identity casbin sees, and it can never be a role
//! name (DESIGN.md section 12); roles come only from a configured claim,
//! through a configured map.

pub mod fetch;
pub mod introspect;
pub mod keys;
pub mod source;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::ident::{Principal, PrincipalError};
use crate::metrics::Metrics;
use crate::setting::{self, invalid, Invalid, Secret};
use introspect::{IntrospectionConfig, Introspector};
use keys::Key;
use serde::{Deserialize, Serialize};
use source::{Freshness, KeySource, Location, Why};
use std::path::PathBuf;

/// Parses a configured algorithm name from the allow-list.
pub fn parse_algorithm(s: &str) -> Option<Algorithm> {
    match s {
        "HS256" => Some(Algorithm::HS256),
        "HS384" => Some(Algorithm::HS384),
        "HS512" => Some(Algorithm::HS512),
        "RS256" => Some(Algorithm::RS256),
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// Every algorithm herald accepts, in the order `auth.algorithms` lists them.
const ACCEPTED: [Algorithm; 6] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// Longest accepted token, in bytes: far above what identity providers issue,
/// far below what would make parsing it cost anything.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The identity (the token's mapped claim, `sub` by default): what
    /// limits count and logs name.
    pub identity: Principal,
    /// What policies are asked about: the identity, with the roles its
    /// token's claims give it ([`Principal::with_roles`]).
    pub subject: Principal,
    /// When the token expires (`exp`, or the end of its maximum age,
    /// whichever is first), as a UNIX timestamp in seconds.
    pub expires_at: u64,
    /// For issuers with introspection: how a live stream re-checks the token.
    pub recheck: Option<Recheck>,
}

/// A token to ask its provider about again, while its stream lives.
#[derive(Clone, Debug)]
pub struct Recheck {
    /// The token.
    pub token: Arc<str>,
    /// Its issuer's provider.
    pub introspector: Arc<Introspector>,
}

impl Caller {
    /// A caller without roles or re-checks (tests, tools).
    pub fn new(identity: Principal, expires_at: u64) -> Self {
        Self {
            subject: identity.clone(),
            identity,
            expires_at,
            recheck: None,
        }
    }
}

impl Caller {
    /// Time left until the token expires (zero if already expired).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(unix_now()))
    }
}

/// Why a token was refused; `reason()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm is not accepted")]
    Algorithm,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is missing the required claim {0}")]
    MissingClaim(&'static str),
    #[error("token claim {0} does not have the type RFC 7519 gives it")]
    ClaimType(&'static str),
    #[error("token issuer or audience is not accepted")]
    Claims,
    #[error("token header names critical extensions herald does not understand")]
    Critical,
    #[error("the token's identity is not accepted: it {0}")]
    Identity(#[source] PrincipalError),
    #[error("the token's issuer is not one herald accepts")]
    Issuer,
    #[error("the token names a key its issuer does not publish")]
    UnknownKey,
    #[error("the token is no longer active (its provider says so)")]
    Inactive,
    #[error("the token's provider cannot be asked now; try again")]
    ProviderUnavailable,
}

impl AuthError {
    /// A stable label for `herald_auth_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::ClaimType(_) => "claim_type",
            AuthError::Claims => "claims",
            AuthError::Critical => "critical_header",
            AuthError::Identity(_) => "identity",
            AuthError::Issuer => "issuer",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Inactive => "inactive",
            AuthError::ProviderUnavailable => "provider_unavailable",
        }
    }

    /// Every label [`reason`](Self::reason) can return.
    pub const REASONS: &'static [&'static str] = &[
        "missing",
        "malformed",
        "algorithm",
        "signature",
        "expired",
        "not_yet_valid",
        "missing_claim",
        "claim_type",
        "claims",
        "critical_header",
        "identity",
        "issuer",
        "unknown_key",
        "inactive",
        "provider_unavailable",
    ];
}

/// A key configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no token verification key configured: set `auth.hs_secret` (env HERALD_AUTH__HS_SECRET), `auth.hs_secret_file` (HERALD_AUTH__HS_SECRET_FILE) or `auth.public_key_file` (HERALD_AUTH__PUBLIC_KEY_FILE), or run `herald serve --dev`")]
    NoKey,
    #[error("`auth.hs_secret` must be at least 32 bytes")]
    WeakSecret,
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("{0}: not a PEM RSA, EC (P-256) or Ed25519 public key")]
    BadPem(String),
    #[error("{0}: {1}")]
    UnusableKey(String, &'static str),
    #[error("`auth.algorithms` lists {0:?} but no key of its family is configured")]
    NoKeyFor(String),
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("issuer {0}: {1}")]
    InIssuer(String, Box<KeyError>),
}

/// The configured HS secret: `auth.hs_secret`, or the content of
/// `auth.hs_secret_file` without its trailing newline.
pub fn hs_secret(cfg: &AuthConfig) -> Result<Option<Vec<u8>>, KeyError> {
    match (&cfg.hs_secret, &cfg.hs_secret_file) {
        (Some(s), _) => Ok(Some(s.expose().as_bytes().to_vec())),
        (None, Some(f)) => {
            let mut b = read_file(f)?;
            while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                b.pop();
            }
            Ok(Some(b))
        }
        (None, None) => Ok(None),
    }
}

/// What a verified token's claims must satisfy (RFC 7519 types, herald's
/// configured values).
#[derive(Clone, Debug)]
pub struct ClaimRules {
    /// Required `iss`, compared exactly (a string, never an array).
    pub issuer: Option<String>,
    /// Required `aud` (a string equal to it, or an array of strings holding it).
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway: u64,
    /// The claim that names the identity (`sub` unless configured).
    pub identity_claim: String,
    /// Put before the identity the claim names.
    pub identity_prefix: String,
    /// Whether a token must carry `exp`.
    pub require_exp: bool,
    /// The oldest a token may be, from its `iat` (then required), in seconds.
    pub max_token_age: Option<u64>,
    /// Claims a token must carry with exactly these string values.
    pub required: BTreeMap<String, String>,
}

impl Default for ClaimRules {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: None,
            leeway: 0,
            identity_claim: "sub".into(),
            identity_prefix: String::new(),
            require_exp: true,
            max_token_age: None,
            required: BTreeMap::new(),
        }
    }
}

/// The claims herald takes from a verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The identity.
    pub subject: Principal,
    /// The end of the token (`exp`, or of its maximum age).
    pub expires_at: u64,
}

/// A NumericDate claim (RFC 7519 section 2): when present, a non-negative
/// integer number of seconds. Floats, strings, negative or oversized numbers
/// are refused rather than rounded or ignored.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(AuthError::ClaimType(name)),
    }
}

impl ClaimRules {
    /// Checks the claims of a token whose signature is verified, at `now`.
    pub fn check(&self, claims: &Value, now: u64) -> Result<Checked, AuthError> {
        let claims = claims.as_object().ok_or(AuthError::Malformed)?;
        let exp = match numeric_date(claims, "exp")? {
            None if self.require_exp => return Err(AuthError::MissingClaim("exp")),
            e => e,
        };
        if let Some(nbf) = numeric_date(claims, "nbf")? {
            if nbf > now.saturating_add(self.leeway) {
                return Err(AuthError::NotYetValid);
            }
        }
        let iat = numeric_date(claims, "iat")?;
        if let Some(iat) = iat {
            if iat > now.saturating_add(self.leeway) {
                return Err(AuthError::NotYetValid);
            }
        }
        // The end of the token: its `exp` (with the leeway), and at most
        // `max_token_age` after its `iat` (an `iat` in the future counts
        // as now; no leeway on top); one of them always (see
        // AuthConfig::validate).
        if let Some(e) = exp {
            if e.saturating_add(self.leeway) <= now {
                return Err(AuthError::Expired);
            }
        }
        let aged_out = match self.max_token_age {
            Some(age) => {
                let born = iat.ok_or(AuthError::MissingClaim("iat"))?.min(now);
                let end = born.saturating_add(age);
                if end <= now {
                    return Err(AuthError::Expired);
                }
                Some(end)
            }
            None => None,
        };
        let expires_at = match (exp, aged_out) {
            (Some(e), Some(a)) => e.min(a),
            (Some(e), None) | (None, Some(e)) => e,
            (None, None) => return Err(AuthError::MissingClaim("exp")),
        };
        match claims.get("iss") {
            None if self.issuer.is_some() => return Err(AuthError::MissingClaim("iss")),
            None => {}
            Some(Value::String(iss)) if self.issuer.as_ref().is_some_and(|want| want != iss) => {
                return Err(AuthError::Claims);
            }
            Some(Value::String(_)) => {}
            Some(_) => return Err(AuthError::ClaimType("iss")),
        }
        let audiences: Vec<&str> = match claims.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().ok_or(AuthError::ClaimType("aud")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(AuthError::ClaimType("aud")),
        };
        if let Some(want) = &self.audience {
            if claims.get("aud").is_none() {
                return Err(AuthError::MissingClaim("aud"));
            }
            if !audiences.iter().any(|a| a == want) {
                return Err(AuthError::Claims);
            }
        }
        for (name, want) in &self.required {
            match claims.get(name) {
                None => return Err(AuthError::MissingClaim("named in required_claims")),
                Some(Value::String(v)) if v == want => {}
                Some(_) => return Err(AuthError::Claims),
            }
        }
        let label = if self.identity_claim == "sub" {
            "sub"
        } else {
            "identity"
        };
        let name = match claims.get(&self.identity_claim) {
            None => return Err(AuthError::MissingClaim(label)),
            Some(Value::String(s)) => s,
            Some(_) => return Err(AuthError::ClaimType(label)),
        };
        // The claim's value is an identity by itself (never empty, never
        // role-like), and stays one with the prefix.
        let mut subject = Principal::parse(name).map_err(AuthError::Identity)?;
        if !self.identity_prefix.is_empty() {
            subject = Principal::parse(&format!("{}{name}", self.identity_prefix))
                .map_err(AuthError::Identity)?;
        }
        Ok(Checked {
            subject,
            expires_at,
        })
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|err| KeyError::Read {
        path: path.display().to_string(),
        err,
    })
}

/// Makes sure the one crypto backend herald builds with is the process's.
fn install_crypto() {
    // An error only says one is installed already.
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

/// Roles from a claim: which claim, and which of its values give which role.
#[derive(Clone, Debug)]
struct RoleMap {
    claim: String,
    map: BTreeMap<String, String>,
}

impl RoleMap {
    /// The roles the claim's values map to (unmapped values give none). The
    /// claim is a string or an array of strings; absent, it gives none.
    fn roles(&self, claims: &Value) -> Result<Vec<String>, AuthError> {
        let mapped = |v: &str| self.map.get(v).cloned();
        match claims.get(&self.claim) {
            None => Ok(Vec::new()),
            Some(Value::String(v)) => Ok(mapped(v).into_iter().collect()),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for item in items {
                    let v = item.as_str().ok_or(AuthError::ClaimType("roles"))?;
                    out.extend(mapped(v));
                }
                Ok(out)
            }
            Some(_) => Err(AuthError::ClaimType("roles")),
        }
    }
}

/// One issuer: its keys, algorithms, claim rules, roles and provider.
struct Issuer {
    /// The issuer, for logs and metric labels.
    label: String,
    /// The `iss` that picks this block (`None`: tokens without `iss`, or,
    /// for a lone `[auth]` without `issuer`, any token).
    issuer: Option<String>,
    /// Configured keys (a secret, a PEM).
    keys: Vec<Key>,
    /// A key set that is refreshed.
    source: Option<Arc<KeySource>>,
    allowed: Vec<Algorithm>,
    rules: ClaimRules,
    roles: Option<RoleMap>,
    introspector: Option<Arc<Introspector>>,
}

/// What a token's keys lookup found.
enum Tried {
    /// The first key that verified it (or why none did).
    Done(Result<Value, AuthError>),
    /// No key of that `kid` and algorithm.
    NoKey,
}

impl Issuer {
    fn from_config(
        cfg: &AuthConfig,
        issuer: Option<String>,
        label: String,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        if let Some(s) = hs_secret(cfg)? {
            if s.len() < 32 {
                return Err(KeyError::WeakSecret);
            }
            let key = DecodingKey::from_secret(&s).map_err(|_| KeyError::WeakSecret)?;
            keys.push(Key {
                kid: None,
                family: AlgorithmFamily::Hmac,
                alg: None,
                key,
            });
        }
        if let Some(f) = &cfg.public_key_file {
            let pem = read_file(f)?;
            keys.push(keys::public_key_from_pem(&f.display().to_string(), &pem)?);
        }
        let location = match (&cfg.jwks_file, &cfg.jwks_url, cfg.discovery) {
            (Some(f), None, false) => Some(Location::File(f.clone())),
            (None, Some(u), false) => Some(Location::Url(cfg.jwks_url_parsed(u)?)),
            (None, None, true) => match &cfg.issuer {
                Some(i) => Some(Location::Discovery { issuer: i.clone() }),
                None => {
                    return Err(
                        invalid("auth.discovery", "needs auth.issuer to discover from").into(),
                    )
                }
            },
            (None, None, false) => None,
            _ => {
                return Err(invalid(
                    "auth.jwks_url",
                    "give one key set: jwks_file, jwks_url or discovery",
                )
                .into())
            }
        };
        // One HTTP client for the issuer's key set and provider, made only
        // when one of them is configured.
        let fetcher = if location.is_some() || cfg.introspection.is_some() {
            let ca = cfg.ca_file.as_deref().map(read_file).transpose()?;
            let f = fetch::Fetcher::new(cfg.fetch_timeout, MAX_FETCH_BYTES, ca.as_deref())
                .map_err(|e| KeyError::from(invalid("auth.ca_file", e)))?;
            Some(f)
        } else {
            None
        };
        let source = match (location, &fetcher) {
            (Some(loc), Some(f)) => Some(Arc::new(KeySource::new(
                label.clone(),
                loc,
                f.clone(),
                Freshness {
                    refresh_interval: cfg.refresh_interval,
                    min_refresh_interval: cfg.min_refresh_interval,
                    max_key_age: cfg.max_key_age,
                },
                cfg.fetch_timeout,
                metrics.clone(),
            ))),
            _ => None,
        };
        if keys.is_empty() && source.is_none() {
            return Err(KeyError::NoKey);
        }
        // A key set's families are known once it loads: it may verify any
        // asymmetric algorithm (never HS: sets hold no secrets).
        let has_key = |a: Algorithm| {
            keys.iter().any(|k| k.family == a.family())
                || (source.is_some() && a.family() != AlgorithmFamily::Hmac)
        };
        let allowed: Vec<Algorithm> = if cfg.algorithms.is_empty() {
            ACCEPTED.into_iter().filter(|a| has_key(*a)).collect()
        } else {
            let mut v = Vec::new();
            for AcceptedAlgorithm(a) in cfg.algorithms.iter().copied() {
                if !has_key(a) {
                    return Err(KeyError::NoKeyFor(format!("{a:?}")));
                }
                v.push(a);
            }
            v
        };
        let introspector = match (&cfg.introspection, &fetcher) {
            (Some(i), Some(f)) => Some(Arc::new(Introspector::new(
                label.clone(),
                i.validate()?,
                i.clone(),
                f.clone(),
                metrics.clone(),
            ))),
            _ => None,
        };
        let roles = cfg.roles_claim.as_ref().map(|claim| RoleMap {
            claim: claim.clone(),
            map: cfg.roles.clone(),
        });
        Ok(Self {
            label,
            rules: ClaimRules {
                issuer: issuer.clone(),
                audience: cfg.audience.clone(),
                leeway: cfg.leeway.as_secs(),
                identity_claim: cfg.identity_claim.clone(),
                identity_prefix: cfg.identity_prefix.clone(),
                require_exp: cfg.require_exp,
                max_token_age: cfg.max_token_age.map(|d| d.as_secs()),
                required: cfg.required_claims.clone(),
            },
            issuer,
            keys,
            source,
            allowed,
            roles,
            introspector,
        })
    }

    /// Tries the keys that may verify a token of `alg` naming `kid`: the
    /// configured ones, and those of the set with that `kid`.
    fn try_keys(&self, token: &str, alg: Algorithm, kid: Option<&str>) -> Tried {
        let set = self.source.as_ref().map(|s| s.keys());
        let of_set = set.as_deref().unwrap_or(&[]);
        let mut tried = false;
        let mut last = AuthError::Signature;
        let configured = keys::candidates(&self.keys, alg, kid, true);
        for key in configured.chain(keys::candidates(of_set, alg, kid, false)) {
            tried = true;
            match decode(token, alg, &key.key) {
                Ok(claims) => return Tried::Done(Ok(claims)),
                Err(e) => last = e,
            }
        }
        if tried {
            Tried::Done(Err(last))
        } else {
            Tried::NoKey
        }
    }

    /// Whether the set could hold `kid` after a refresh: it is refreshed,
    /// and does not hold it now.
    fn may_refresh_for(&self, kid: Option<&str>) -> Option<&Arc<KeySource>> {
        let kid = kid?;
        let source = self.source.as_ref()?;
        (!source.keys().iter().any(|k| k.kid.as_deref() == Some(kid))).then_some(source)
    }
}

/// Claims with settings of their own.
const REGISTERED: [&str; 6] = ["exp", "nbf", "iat", "iss", "aud", "sub"];

/// Largest key set or discovery document read.
const MAX_FETCH_BYTES: usize = 1024 * 1024;

/// Verifies `token`'s signature with `key`; the claims are herald's to check.
fn decode(token: &str, alg: Algorithm, key: &DecodingKey) -> Result<Value, AuthError> {
    let mut v = Validation::new(alg);
    // The claims are herald's to check, strictly (ClaimRules::check).
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(token, key, &v)
        .map(|d| d.claims)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => AuthError::Signature,
                K::InvalidAlgorithm | K::InvalidAlgorithmName | K::InvalidKeyFormat => {
                    AuthError::Algorithm
                }
                _ => AuthError::Malformed,
            }
        })
}

/// The decoded payload (claims JSON) of a compact token.
fn payload(token: &str) -> Result<Vec<u8>, AuthError> {
    let part = token.split('.').nth(1).ok_or(AuthError::Malformed)?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed)
}

/// The `iss` of a token's payload, read before its signature is checked
/// (it picks the keys): a string, or absent.
fn peek_issuer(payload: &[u8]) -> Result<Option<String>, AuthError> {
    #[derive(Deserialize)]
    struct Peek {
        iss: Option<Value>,
    }
    let peek: Peek = serde_json::from_slice(payload).map_err(|_| AuthError::Malformed)?;
    match peek.iss {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(AuthError::ClaimType("iss")),
    }
}

/// Verifies bearer tokens.
pub struct Verifier {
    issuers: Vec<Issuer>,
    /// `[auth]` alone: its one block takes any `iss` its rules allow.
    single: bool,
    metrics: Arc<Metrics>,
}

impl Verifier {
    /// Builds the verifier from `[auth]`, with metrics of its own.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, KeyError> {
        Self::with_metrics(cfg, Arc::new(Metrics::new()))
    }

    /// Builds the verifier from `[auth]`; key sets and introspection count
    /// into `metrics`. Key sets load once [`run`](Self::run) runs.
    pub fn with_metrics(cfg: &AuthConfig, metrics: Arc<Metrics>) -> Result<Self, KeyError> {
        install_crypto();
        cfg.validate()?;
        if cfg.issuers.is_empty() {
            let label = cfg.issuer.clone().unwrap_or_else(|| "default".into());
            let one = Issuer::from_config(cfg, cfg.issuer.clone(), label, &metrics)?;
            return Ok(Self {
                issuers: vec![one],
                single: true,
                metrics,
            });
        }
        let mut issuers = Vec::new();
        for block in &cfg.issuers {
            let label = block.issuer.clone().unwrap_or_else(|| "none".into());
            let one = Issuer::from_config(block, block.issuer.clone(), label.clone(), &metrics)
                .map_err(|e| KeyError::InIssuer(label, Box::new(e)))?;
            issuers.push(one);
        }
        Ok(Self {
            issuers,
            single: false,
            metrics,
        })
    }

    /// The metrics it counts into (the instance's: `app::start` uses them).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Loads and refreshes every key set until `stopped` resolves.
    pub fn run<F>(&self, stopped: impl Fn() -> F) -> Vec<tokio::task::JoinHandle<()>>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.issuers
            .iter()
            .filter_map(|i| i.source.clone())
            .map(|s| tokio::spawn(s.run(stopped())))
            .collect()
    }

    /// Whether every key set is loaded and younger than its `max_key_age`.
    pub fn key_sets_fresh(&self) -> bool {
        self.issuers
            .iter()
            .filter_map(|i| i.source.as_ref())
            .all(|s| s.is_fresh())
    }

    fn issuer_for(&self, iss: Option<&str>) -> Result<&Issuer, AuthError> {
        if self.single {
            return Ok(&self.issuers[0]);
        }
        self.issuers
            .iter()
            .find(|i| i.issuer.as_deref() == iss)
            .ok_or(AuthError::Issuer)
    }

    /// Verifies a token and returns the caller it names.
    ///
    /// The token's `iss` picks its issuer; the header's `alg` and `kid`
    /// pick among that issuer's keys (a `kid` its key set does not hold
    /// refreshes the set once, rate-limited); `jku`, `x5u` and an embedded
    /// `jwk` are never used. The library checks the signature (and `crit`,
    /// which herald refuses whatever it names); every claim is then checked
    /// by herald, with RFC 7519's types ([`ClaimRules::check`]). Issuers
    /// with introspection then ask their provider.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.crit.is_some() {
            return Err(AuthError::Critical);
        }
        let payload = payload(token)?;
        let issuer = self.issuer_for(peek_issuer(&payload)?.as_deref())?;
        if !issuer.allowed.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        let kid = header.kid.as_deref();
        if let Some(source) = issuer.may_refresh_for(kid) {
            source.refresh(Why::UnknownKid).await;
        }
        let claims = match issuer.try_keys(token, header.alg, kid) {
            Tried::Done(r) => r?,
            // The set never loaded: the token may be good; come back.
            Tried::NoKey if issuer.source.as_ref().is_some_and(|s| !s.has_loaded()) => {
                return Err(AuthError::ProviderUnavailable)
            }
            Tried::NoKey => return Err(AuthError::UnknownKey),
        };
        // The signature holds: now make sure each claim has one value (a
        // parser reading the first of two would see another token).
        if !claims_are_unique(&payload) {
            return Err(AuthError::Malformed);
        }
        let checked = issuer.rules.check(&claims, unix_now())?;
        let roles = match &issuer.roles {
            Some(map) => map.roles(&claims)?,
            None => Vec::new(),
        };
        let recheck = match &issuer.introspector {
            Some(i) => match i.is_active(token).await {
                Ok(true) => Some(Recheck {
                    token: Arc::from(token),
                    introspector: i.clone(),
                }),
                Ok(false) => return Err(AuthError::Inactive),
                Err(_) => return Err(AuthError::ProviderUnavailable),
            },
            None => None,
        };
        tracing::trace!(issuer = %issuer.label, "token verified");
        Ok(Caller {
            subject: checked.subject.with_roles(&roles),
            identity: checked.subject,
            expires_at: checked.expires_at,
            recheck,
        })
    }
}

/// Whether `name` may be given by a token's claims (`auth.roles` values,
/// `policy explain --role`): a role name (`role:…`) a policy line can hold.
pub fn is_claimable_role(name: &str) -> bool {
    crate::ident::is_role_name(name)
        && name.len() > crate::ident::ROLE_PREFIX.len()
        && name.len() <= crate::ident::MAX_PRINCIPAL_LEN
        && !name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == ',' || c == '"')
}

/// Whether a token's payload (already verified) names each claim once:
/// `serde_json` keeps the last of repeated keys, and another reader of the
/// same token could keep the first.
fn claims_are_unique(payload: &[u8]) -> bool {
    struct Unique;
    impl<'de> Deserialize<'de> for Unique {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Unique;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Unique, A::Error> {
                    let mut seen = std::collections::HashSet::new();
                    while let Some(k) = m.next_key::<String>()? {
                        if !seen.insert(k) {
                            return Err(serde::de::Error::custom("a repeated claim"));
                        }
                        m.next_value::<serde::de::IgnoredAny>()?;
                    }
                    Ok(Unique)
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Unique>(payload).is_ok()
}

/// Seconds since the UNIX epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("an HMAC secret must not be empty")]
    EmptySecret,
    #[error("{0:?} does not use a PEM private key")]
    NotPem(Algorithm),
    #[error("cannot read the private key")]
    BadKey(#[source] jsonwebtoken::errors::Error),
    #[error("--sub {0:?}")]
    Subject(String, #[source] PrincipalError),
    #[error("cannot sign the token")]
    Encode(#[source] jsonwebtoken::errors::Error),
}

/// A signing key for `herald token mint` and dev mode.
pub struct Signer {
    alg: Algorithm,
    key: EncodingKey,
}

impl Signer {
    /// An HMAC signer (HS256/384/512).
    pub fn hmac(alg: Algorithm, secret: &[u8]) -> Result<Self, SignError> {
        install_crypto();
        let key = EncodingKey::from_secret(secret).map_err(|_| SignError::EmptySecret)?;
        Ok(Self { alg, key })
    }

    /// A signer from a PEM private key; `alg` picks how to read it.
    pub fn from_pem(alg: Algorithm, pem: &[u8]) -> Result<Self, SignError> {
        install_crypto();
        let key = match alg.family() {
            AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pem),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem),
            AlgorithmFamily::Ed => EncodingKey::from_ed_pem(pem),
            _ => return Err(SignError::NotPem(alg)),
        }
        .map_err(SignError::BadKey)?;
        Ok(Self { alg, key })
    }

    /// Mints a token for `sub` valid for `ttl`, with optional `iss`/`aud`.
    /// `sub` must be a valid identity (never a role).
    pub fn mint(
        &self,
        sub: &str,
        ttl: Duration,
        iss: Option<&str>,
        aud: Option<&str>,
    ) -> Result<String, SignError> {
        self.mint_as("sub", sub, ttl, iss, aud)
    }

    /// [`mint`](Self::mint), the identity in `claim` (`auth.identity_claim`).
    pub fn mint_as(
        &self,
        claim: &str,
        sub: &str,
        ttl: Duration,
        iss: Option<&str>,
        aud: Option<&str>,
    ) -> Result<String, SignError> {
        Principal::parse(sub).map_err(|e| SignError::Subject(sub.to_owned(), e))?;
        let now = unix_now();
        let exp = now.saturating_add(ttl.as_secs());
        let mut claims = serde_json::json!({"iat": now, "exp": exp});
        claims[claim] = sub.into();
        if let Some(i) = iss {
            claims["iss"] = i.into();
        }
        if let Some(a) = aud {
            claims["aud"] = a.into();
        }
        self.sign(&claims)
    }

    /// Signs arbitrary claims (tests of hostile tokens; `mint` for the rest).
    pub fn sign(&self, claims: &Value) -> Result<String, SignError> {
        jsonwebtoken::encode(&Header::new(self.alg), claims, &self.key).map_err(SignError::Encode)
    }
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared secret for HS256/384/512 tokens (redacted in `config print`).
    pub hs_secret: Option<Secret>,
    /// File holding the HS secret (trailing newline ignored).
    pub hs_secret_file: Option<PathBuf>,
    /// PEM public key for RS256, ES256 or EdDSA tokens.
    pub public_key_file: Option<PathBuf>,
    /// Accepted algorithms; empty means every algorithm a configured key can verify.
    pub algorithms: Vec<AcceptedAlgorithm>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// The claim naming the identity (`sub`; e.g. `identityId`).
    pub identity_claim: String,
    /// Put before every identity (e.g. `idp:`), so that identities of
    /// different sources cannot collide.
    pub identity_prefix: String,
    /// Whether tokens must carry `exp`; `false` needs `max_token_age`.
    pub require_exp: bool,
    /// The oldest a token may be, from its `iat` (then required).
    #[serde(with = "humantime_serde")]
    pub max_token_age: Option<Duration>,
    /// A JWKS file, re-read on every refresh.
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (https; plain http only to a loopback address).
    pub jwks_url: Option<String>,
    /// Find the key set from `{issuer}/.well-known/openid-configuration`.
    pub discovery: bool,
    /// PEM CA bundle: the only roots this issuer's HTTPS trusts (the
    /// system's otherwise).
    pub ca_file: Option<PathBuf>,
    /// How often a key set is refreshed.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// The least time between refreshes asked for by unknown `kid`s.
    #[serde(with = "humantime_serde")]
    pub min_refresh_interval: Duration,
    /// A key set older than this (refreshes failing) fails `/readyz`.
    #[serde(with = "humantime_serde")]
    pub max_key_age: Duration,
    /// Time-out of each key set or discovery request.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Claims a token must carry with exactly these string values (e.g.
    /// `authTokenType = "identityAccessToken"`).
    pub required_claims: BTreeMap<String, String>,
    /// The claim whose values give roles (e.g. `groups`), through `roles`.
    pub roles_claim: Option<String>,
    /// Claim value -> role name (`role:…`); other values give no role.
    pub roles: BTreeMap<String, String>,
    /// Ask the provider whether each token is still active.
    pub introspection: Option<IntrospectionConfig>,
    /// Several issuers, each a block of the keys above; a token's `iss`
    /// picks its block.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<AuthConfig>,
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
            identity_claim: "sub".into(),
            identity_prefix: String::new(),
            require_exp: true,
            max_token_age: None,
            jwks_file: None,
            jwks_url: None,
            discovery: false,
            ca_file: None,
            refresh_interval: Duration::from_secs(300),
            min_refresh_interval: Duration::from_secs(10),
            max_key_age: Duration::from_secs(24 * 3600),
            fetch_timeout: Duration::from_secs(5),
            required_claims: BTreeMap::new(),
            roles_claim: None,
            roles: BTreeMap::new(),
            introspection: None,
            issuers: Vec::new(),
        }
    }
}

impl AuthConfig {
    fn jwks_url_parsed(&self, u: &str) -> Result<url::Url, Invalid> {
        let url =
            url::Url::parse(u).map_err(|e| invalid("auth.jwks_url", format!("not a URL: {e}")))?;
        fetch::check_url(&url).map_err(|why| invalid("auth.jwks_url", why))?;
        Ok(url)
    }

    /// Checks what serde cannot, in `[auth]` and every issuer block.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.validate_block()?;
        if self.issuers.is_empty() {
            return Ok(());
        }
        let top = AuthConfig {
            issuers: Vec::new(),
            ..self.clone()
        };
        let as_json = |c: &AuthConfig| serde_json::to_value(c).ok();
        if as_json(&top) != as_json(&AuthConfig::default()) {
            return Err(invalid(
                "auth.issuers",
                "with [[auth.issuers]], every other auth setting goes in the blocks: [auth] holds only them",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, block) in self.issuers.iter().enumerate() {
            let name = block.issuer.as_deref().unwrap_or("(tokens without iss)");
            let wrap = |e: Invalid| {
                invalid(
                    "auth.issuers",
                    format!("[{i}] {name}: `{}` {}", e.key, e.message),
                )
            };
            if !block.issuers.is_empty() {
                return Err(wrap(invalid("auth.issuers", "a block holds no blocks")));
            }
            block.validate_block().map_err(wrap)?;
            if !seen.insert(block.issuer.clone()) {
                return Err(wrap(invalid("auth.issuer", "two blocks have this issuer")));
            }
            // Identities of two issuers must never be the same name: each
            // has its own prefix, and none starts another's.
            let prefix = &block.identity_prefix;
            let clash = self.issuers.iter().enumerate().any(|(j, other)| {
                j != i
                    && (other.identity_prefix.starts_with(prefix.as_str())
                        || prefix.starts_with(other.identity_prefix.as_str()))
            });
            if self.issuers.len() > 1 && (prefix.is_empty() || clash) {
                return Err(wrap(invalid(
                    "auth.identity_prefix",
                    "with several issuers, each needs its own identity_prefix, none the start of another's (so that no issuer can name another's identities)",
                )));
            }
        }
        Ok(())
    }

    fn validate_block(&self) -> Result<(), Invalid> {
        if let Some(u) = &self.jwks_url {
            self.jwks_url_parsed(u)?;
        }
        if let Some(i) = &self.introspection {
            i.validate()?;
        }
        if self.discovery {
            let Some(iss) = &self.issuer else {
                return Err(invalid("auth.discovery", "needs auth.issuer"));
            };
            let url = url::Url::parse(iss)
                .map_err(|_| invalid("auth.issuer", "discovery needs an issuer that is a URL"))?;
            fetch::check_url(&url).map_err(|why| invalid("auth.issuer", why))?;
        }
        setting::duration(
            "auth.refresh_interval",
            self.refresh_interval,
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        )?;
        setting::duration(
            "auth.min_refresh_interval",
            self.min_refresh_interval,
            Duration::from_secs(1),
            self.refresh_interval,
        )?;
        setting::duration(
            "auth.max_key_age",
            self.max_key_age,
            self.refresh_interval,
            setting::MAX_DURATION,
        )?;
        setting::duration(
            "auth.fetch_timeout",
            self.fetch_timeout,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?;
        if self.required_claims.len() > 16
            || self
                .required_claims
                .keys()
                .any(|k| k.is_empty() || k.len() > 64 || REGISTERED.contains(&k.as_str()))
        {
            return Err(invalid(
                "auth.required_claims",
                "at most 16 claims, named 1 to 64 bytes, none of exp nbf iat iss aud sub (those have their own settings)",
            ));
        }
        if let Some(claim) = &self.roles_claim {
            if claim.is_empty() || claim.len() > 64 || *claim == self.identity_claim {
                return Err(invalid(
                    "auth.roles_claim",
                    "must be a claim name (1 to 64 bytes), not the identity claim",
                ));
            }
            if self.roles.is_empty() {
                return Err(invalid(
                    "auth.roles",
                    "roles_claim needs a map of claim values to roles",
                ));
            }
        } else if !self.roles.is_empty() {
            return Err(invalid("auth.roles_claim", "auth.roles needs roles_claim"));
        }
        if let Some((value, role)) = self
            .roles
            .iter()
            .find(|(v, r)| v.is_empty() || v.len() > 256 || !is_claimable_role(r))
        {
            return Err(invalid(
                "auth.roles",
                format!("{value:?} = {role:?}: values are 1 to 256 bytes, roles are role names (role:…) without spaces or commas"),
            ));
        }
        setting::duration(
            "auth.leeway",
            self.leeway,
            Duration::ZERO,
            Duration::from_secs(600),
        )?;
        let claim = &self.identity_claim;
        if claim.is_empty()
            || claim.len() > 64
            || !claim
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
        {
            return Err(invalid(
                "auth.identity_claim",
                "must be a claim name: 1 to 64 of A-Z a-z 0-9 _ - . :",
            ));
        }
        if ["exp", "nbf", "iat", "iss", "aud", "jti"].contains(&claim.as_str()) {
            return Err(invalid(
                "auth.identity_claim",
                "must not be a registered claim other than sub",
            ));
        }
        let prefix = &self.identity_prefix;
        if prefix.len() > 64
            || !prefix.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/')
            })
        {
            return Err(invalid(
                "auth.identity_prefix",
                "must be at most 64 of A-Z a-z 0-9 _ - . : @ /",
            ));
        }
        if prefix.to_ascii_lowercase().starts_with("role") {
            return Err(invalid(
                "auth.identity_prefix",
                "would make identities look like roles",
            ));
        }
        if let Some(age) = self.max_token_age {
            setting::duration(
                "auth.max_token_age",
                age,
                Duration::from_secs(1),
                setting::MAX_DURATION,
            )?;
        }
        if !self.require_exp && self.max_token_age.is_none() {
            return Err(invalid(
                "auth.require_exp",
                "tokens without exp need auth.max_token_age (the longest a token lives from its iat)",
            ));
        }
        Ok(())
    }
}

/// An algorithm of herald's allow-list, as `auth.algorithms` names it
/// (HS256, HS384, HS512, RS256, ES256, EdDSA; never `none`), parsed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptedAlgorithm(pub Algorithm);

impl Serialize for AcceptedAlgorithm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let name = match self.0 {
            Algorithm::HS256 => "HS256",
            Algorithm::HS384 => "HS384",
            Algorithm::HS512 => "HS512",
            Algorithm::RS256 => "RS256",
            Algorithm::ES256 => "ES256",
            _ => "EdDSA",
        };
        s.serialize_str(name)
    }
}

impl<'de> Deserialize<'de> for AcceptedAlgorithm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        parse_algorithm(&name)
            .map(AcceptedAlgorithm)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                "unsupported algorithm {name:?}; allowed: HS256, HS384, HS512, RS256, ES256, EdDSA"
            ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// Verifies with configured keys, which never wait.
    fn block<F: std::future::Future>(f: F) -> F::Output {
        futures_util::FutureExt::now_or_never(f).expect("configured keys never wait")
    }

    fn verifier() -> Verifier {
        Verifier::from_config(&AuthConfig {
            hs_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn signer() -> Signer {
        Signer::hmac(Algorithm::HS256, SECRET.as_bytes()).unwrap()
    }

    #[test]
    fn round_trip() {
        let t = signer()
            .mint("alice", Duration::from_secs(60), None, None)
            .unwrap();
        let id = block(verifier().verify(&t)).unwrap();
        assert_eq!(id.identity.as_str(), "alice");
        assert!(id.remaining() > Duration::from_secs(50));
    }

    #[test]
    fn refuses_none_garbage_expired_and_wrong_key() {
        let v = verifier();
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"sub":"a","exp":9999999999}"#)
        );
        assert!(block(v.verify(&none)).is_err());
        assert!(matches!(
            block(v.verify("garbage")),
            Err(AuthError::Malformed)
        ));
        let t = signer()
            .sign(&json!({"sub": "a", "exp": unix_now() - 3600}))
            .unwrap();
        assert!(matches!(block(v.verify(&t)), Err(AuthError::Expired)));
        let other = Signer::hmac(Algorithm::HS256, b"another-secret-another-secret-xx")
            .unwrap()
            .mint("a", Duration::from_secs(60), None, None)
            .unwrap();
        assert!(matches!(block(v.verify(&other)), Err(AuthError::Signature)));
        let no_exp = signer().sign(&json!({"sub": "a"})).unwrap();
        assert!(matches!(
            block(v.verify(&no_exp)),
            Err(AuthError::MissingClaim("exp"))
        ));
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(block(v.verify(&huge)), Err(AuthError::Malformed)));
    }

    #[test]
    fn short_secret_and_missing_key_are_config_errors() {
        assert!(matches!(
            Verifier::from_config(&AuthConfig::default()),
            Err(KeyError::NoKey)
        ));
        let weak = AuthConfig {
            hs_secret: Some("short".into()),
            ..AuthConfig::default()
        };
        assert!(matches!(
            Verifier::from_config(&weak),
            Err(KeyError::WeakSecret)
        ));
        assert!(matches!(
            Signer::hmac(Algorithm::HS256, b""),
            Err(SignError::EmptySecret)
        ));
    }

    fn rules(issuer: Option<&str>, audience: Option<&str>) -> ClaimRules {
        ClaimRules {
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
            leeway: 5,
            ..ClaimRules::default()
        }
    }

    #[test]
    fn the_identity_comes_from_the_configured_claim_with_its_prefix() {
        let r = ClaimRules {
            identity_claim: "identityId".into(),
            identity_prefix: "infisical:".into(),
            ..rules(None, None)
        };
        let ok = r
            .check(
                &json!({"identityId": "0f3c", "sub": "ignored", "exp": NOW + 60}),
                NOW,
            )
            .unwrap();
        assert_eq!(ok.subject.as_str(), "infisical:0f3c");
        for (claims, want) in [
            (json!({"sub": "alice", "exp": NOW + 60}), "missing_claim"),
            (json!({"identityId": 7, "exp": NOW + 60}), "claim_type"),
            (json!({"identityId": ["a"], "exp": NOW + 60}), "claim_type"),
            (json!({"identityId": "", "exp": NOW + 60}), "identity"),
            (json!({"identityId": "a b", "exp": NOW + 60}), "identity"),
        ] {
            let got = r.check(&claims, NOW).unwrap_err();
            assert_eq!(got.reason(), want, "{claims}");
        }
        // No value is a role, with or without the prefix.
        let bare = ClaimRules {
            identity_claim: "identityId".into(),
            ..rules(None, None)
        };
        for v in ["role:admin", "ROLE:admin", "roles_x"] {
            assert!(
                bare.check(&json!({"identityId": v, "exp": NOW + 60}), NOW)
                    .is_err(),
                "{v}"
            );
            assert!(
                r.check(&json!({"identityId": v, "exp": NOW + 60}), NOW)
                    .is_err(),
                "{v}"
            );
        }
        let partial = ClaimRules {
            identity_prefix: "rol".into(),
            ..bare.clone()
        };
        assert!(partial
            .check(&json!({"identityId": "e:admin", "exp": NOW + 60}), NOW)
            .is_err());
    }

    #[test]
    fn a_claim_named_twice_is_refused() {
        let token = |payload: &str| {
            let b = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
            format!("{}.{}.sig", b(r#"{"alg":"HS256"}"#), b(payload))
        };
        let claims_are_unique = |t: &str| payload(t).is_ok_and(|p| super::claims_are_unique(&p));
        assert!(claims_are_unique(&token(r#"{"identityId":"a","exp":1}"#)));
        for bad in [
            r#"{"identityId":"a","identityId":"b"}"#,
            r#"{"iat":1,"iat":2}"#,
            r#"["not","an","object"]"#,
            "not json",
        ] {
            assert!(!claims_are_unique(&token(bad)), "{bad}");
        }
        assert!(!claims_are_unique("no-dots"));
        // Through the verifier, signature and all.
        let v = Verifier::from_config(&AuthConfig {
            hs_secret: Some(Secret::new("0123456789abcdef0123456789abcdef")),
            identity_claim: "identityId".into(),
            ..AuthConfig::default()
        })
        .unwrap();
        let signer = Signer::hmac(Algorithm::HS256, b"0123456789abcdef0123456789abcdef").unwrap();
        let good = signer
            .sign(&json!({"identityId": "b", "exp": unix_now() + 60}))
            .unwrap();
        assert_eq!(block(v.verify(&good)).unwrap().identity.as_str(), "b");
        let header = good.split('.').next().unwrap();
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            r#"{{"identityId":"a","identityId":"b","exp":{}}}"#,
            unix_now() + 60
        ));
        let signing_input = format!("{header}.{payload}");
        let sig = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef").unwrap(),
            Algorithm::HS256,
        )
        .unwrap();
        assert!(matches!(
            block(v.verify(&format!("{signing_input}.{sig}"))),
            Err(AuthError::Malformed)
        ));
    }

    #[test]
    fn required_claims_must_hold_their_exact_values() {
        let r = ClaimRules {
            required: [("authTokenType".to_owned(), "identityAccessToken".to_owned())].into(),
            ..rules(None, None)
        };
        assert!(r
            .check(&with(json!({"authTokenType": "identityAccessToken"})), NOW)
            .is_ok());
        for (extra, want) in [
            (json!({}), "missing_claim"),
            (json!({"authTokenType": "accessToken"}), "claims"),
            (json!({"authTokenType": ["identityAccessToken"]}), "claims"),
            (json!({"authTokenType": "IdentityAccessToken"}), "claims"),
        ] {
            assert_eq!(
                r.check(&with(extra.clone()), NOW).unwrap_err().reason(),
                want,
                "{extra}"
            );
        }
        for bad in ["exp", "sub", ""] {
            let cfg = AuthConfig {
                required_claims: [(bad.to_owned(), "x".to_owned())].into(),
                ..AuthConfig::default()
            };
            assert!(cfg.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_without_exp_live_up_to_the_maximum_age() {
        let r = ClaimRules {
            require_exp: false,
            max_token_age: Some(3600),
            ..rules(None, None)
        };
        let fresh = r.check(&json!({"sub": "a", "iat": NOW - 60}), NOW).unwrap();
        assert_eq!(fresh.expires_at, NOW - 60 + 3600, "streams end at the age");
        assert!(matches!(
            r.check(&json!({"sub": "a", "iat": NOW - 3700}), NOW),
            Err(AuthError::Expired)
        ));
        assert!(matches!(
            r.check(&json!({"sub": "a"}), NOW),
            Err(AuthError::MissingClaim("iat"))
        ));
        // An iat in the future counts as now: no extra life.
        let early = r.check(&json!({"sub": "a", "iat": NOW + 4}), NOW).unwrap();
        assert_eq!(early.expires_at, NOW + 3600);
        // With exp too, the earlier end wins.
        let both = r
            .check(&json!({"sub": "a", "iat": NOW, "exp": NOW + 60}), NOW)
            .unwrap();
        assert_eq!(both.expires_at, NOW + 60);
        let capped = r
            .check(&json!({"sub": "a", "iat": NOW, "exp": NOW + 99_999}), NOW)
            .unwrap();
        assert_eq!(capped.expires_at, NOW + 3600);
        // Where exp is required, its absence is refused whatever the age.
        let strict = ClaimRules {
            max_token_age: Some(3600),
            ..rules(None, None)
        };
        assert!(matches!(
            strict.check(&json!({"sub": "a", "iat": NOW}), NOW),
            Err(AuthError::MissingClaim("exp"))
        ));
    }

    #[test]
    fn claim_mapping_settings_are_checked() {
        let base = AuthConfig::default();
        assert!(base.validate().is_ok());
        for bad in [
            AuthConfig {
                require_exp: false,
                ..AuthConfig::default()
            },
            AuthConfig {
                identity_claim: "exp".into(),
                ..AuthConfig::default()
            },
            AuthConfig {
                identity_claim: String::new(),
                ..AuthConfig::default()
            },
            AuthConfig {
                identity_claim: "a b".into(),
                ..AuthConfig::default()
            },
            AuthConfig {
                identity_prefix: "role:".into(),
                ..AuthConfig::default()
            },
            AuthConfig {
                identity_prefix: "a,b".into(),
                ..AuthConfig::default()
            },
            AuthConfig {
                identity_prefix: "Roles".into(),
                ..AuthConfig::default()
            },
            AuthConfig {
                identity_prefix: "a\"b".into(),
                ..AuthConfig::default()
            },
            AuthConfig {
                max_token_age: Some(Duration::ZERO),
                ..AuthConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let infisical = AuthConfig {
            identity_claim: "identityId".into(),
            identity_prefix: "infisical:".into(),
            require_exp: false,
            max_token_age: Some(Duration::from_secs(86400)),
            ..AuthConfig::default()
        };
        assert!(infisical.validate().is_ok());
    }

    const NOW: u64 = 1_800_000_000;

    fn with(extra: Value) -> Value {
        let mut c = json!({"sub": "alice", "exp": NOW + 60});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    #[test]
    fn time_claims_have_numeric_types() {
        let r = rules(None, None);
        assert!(r.check(&with(json!({})), NOW).is_ok());
        for (claim, value) in [
            ("nbf", json!("99999999999")),
            ("nbf", json!(1.5)),
            ("nbf", json!(-1)),
            ("nbf", json!(null)),
            ("exp", json!("99999999999")),
            ("exp", json!(1e10)),
            ("exp", json!(-1)),
            ("exp", json!(18446744073709551616.0)),
            ("exp", json!(true)),
            ("iat", json!("1")),
            ("iat", json!({})),
        ] {
            let got = r.check(&with(json!({ claim: value.clone() })), NOW);
            assert!(
                matches!(got, Err(AuthError::ClaimType(c)) if c == claim),
                "{claim} = {value}: {got:?}"
            );
        }
        assert!(matches!(
            r.check(&with(json!({"nbf": NOW + 100})), NOW),
            Err(AuthError::NotYetValid)
        ));
        assert!(matches!(
            r.check(&with(json!({"iat": NOW + 100})), NOW),
            Err(AuthError::NotYetValid)
        ));
        assert!(r
            .check(&with(json!({"nbf": NOW + 3, "iat": NOW})), NOW)
            .is_ok());
        // The largest exp never overflows anything.
        let far = r.check(&with(json!({"exp": u64::MAX})), NOW).unwrap();
        assert_eq!(far.expires_at, u64::MAX);
        assert!(matches!(
            r.check(&with(json!({"exp": NOW - 6})), NOW),
            Err(AuthError::Expired)
        ));
    }

    #[test]
    fn a_configured_audience_or_issuer_is_required_with_its_type() {
        let r = rules(Some("https://idp"), Some("herald"));
        let ok = with(json!({"iss": "https://idp", "aud": "herald"}));
        assert!(r.check(&ok, NOW).is_ok());
        assert!(r
            .check(
                &with(json!({"iss": "https://idp", "aud": ["x", "herald"]})),
                NOW
            )
            .is_ok());
        let cases = [
            (json!({"iss": "https://idp"}), "missing aud"),
            (json!({"iss": "https://idp", "aud": 7}), "numeric aud"),
            (
                json!({"iss": "https://idp", "aud": {"herald": true}}),
                "object aud",
            ),
            (
                json!({"iss": "https://idp", "aud": ["herald", 1]}),
                "mixed aud",
            ),
            (json!({"iss": "https://idp", "aud": "other"}), "other aud"),
            (json!({"iss": "https://idp", "aud": []}), "empty aud"),
            (json!({"aud": "herald"}), "missing iss"),
            (
                json!({"iss": ["https://idp"], "aud": "herald"}),
                "array iss",
            ),
            (
                json!({"iss": ["x", "https://idp"], "aud": "herald"}),
                "array iss",
            ),
            (json!({"iss": "https://idp2", "aud": "herald"}), "other iss"),
        ];
        for (extra, what) in cases {
            assert!(r.check(&with(extra), NOW).is_err(), "{what}");
        }
        // Unconfigured, the claims may be absent but never of the wrong type.
        let none = rules(None, None);
        assert!(none
            .check(&with(json!({"aud": ["a"], "iss": "x"})), NOW)
            .is_ok());
        assert!(none.check(&with(json!({"aud": 5})), NOW).is_err());
        assert!(none.check(&with(json!({"iss": 5})), NOW).is_err());
    }

    #[test]
    fn no_token_names_a_role() {
        let r = rules(None, None);
        for sub in ["role:admin", "Role:reader", "role", "roles:x"] {
            assert!(matches!(
                r.check(&with(json!({"sub": sub})), NOW),
                Err(AuthError::Identity(PrincipalError::RoleLike))
            ));
        }
        assert!(matches!(
            r.check(&with(json!({"sub": 42})), NOW),
            Err(AuthError::ClaimType("sub"))
        ));
        assert!(signer()
            .mint("role:admin", Duration::from_secs(60), None, None)
            .is_err());
    }

    #[test]
    fn critical_headers_are_refused() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let payload = b64(&json!({"sub": "a", "exp": unix_now() + 60}).to_string());
        for header in [
            r#"{"alg":"HS256","crit":["exp"]}"#,
            r#"{"alg":"HS256","crit":["b64"],"b64":true}"#,
        ] {
            let input = format!("{}.{payload}", b64(header));
            let sig = jsonwebtoken::crypto::sign(
                input.as_bytes(),
                &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
                Algorithm::HS256,
            )
            .unwrap();
            let token = format!("{input}.{sig}");
            assert!(block(verifier().verify(&token)).is_err(), "{header}");
        }
    }
}
