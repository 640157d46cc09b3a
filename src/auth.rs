//! Bearer tokens: JWT verification (and minting for operators and dev mode).
//!
//! Only the algorithms of an allow-list are accepted (HS256/384/512, RS256,
//! ES256, EdDSA; never `none`), and each algorithm is verified only with a key of
//! its own family, so an HS secret can never verify an RS token or the reverse.
//! `exp` is required; `iss`/`aud` are checked when configured. The `sub` claim is
//! the identity casbin sees.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

fn family(alg: Algorithm) -> Option<Family> {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Some(Family::Hmac),
        Algorithm::RS256 => Some(Family::Rsa),
        Algorithm::ES256 => Some(Family::Ec),
        Algorithm::EdDSA => Some(Family::Ed),
        _ => None,
    }
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The `sub` claim.
    pub subject: Arc<str>,
    /// When the token expires (`exp`), as a UNIX timestamp in seconds.
    pub expires_at: u64,
}

impl Identity {
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
    #[error("token issuer or audience is not accepted")]
    Claims,
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
            AuthError::Claims => "claims",
        }
    }
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
    #[error("{0}: not a PEM RSA, EC (P-256) or Ed25519 key")]
    BadPem(String),
    #[error("`auth.algorithms` lists {0:?} but no key of its family is configured")]
    NoKeyFor(String),
}

#[derive(Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
}

/// The configured HS secret: `auth.hs_secret`, or the content of
/// `auth.hs_secret_file` without its trailing newline.
pub fn hs_secret(cfg: &AuthConfig) -> Result<Option<Vec<u8>>, KeyError> {
    match (&cfg.hs_secret, &cfg.hs_secret_file) {
        (Some(s), _) => Ok(Some(s.as_bytes().to_vec())),
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

/// Verifies bearer tokens.
pub struct Verifier {
    keys: Vec<(Family, DecodingKey)>,
    allowed: Vec<Algorithm>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

fn read_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|err| KeyError::Read {
        path: path.display().to_string(),
        err,
    })
}

impl Verifier {
    /// Builds the verifier from `[auth]`.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        if let Some(s) = hs_secret(cfg)? {
            if s.len() < 32 {
                return Err(KeyError::WeakSecret);
            }
            keys.push((Family::Hmac, DecodingKey::from_secret(&s)));
        }
        if let Some(f) = &cfg.public_key_file {
            let pem = read_file(f)?;
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (Family::Rsa, k)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (Family::Ec, k)
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                (Family::Ed, k)
            } else {
                return Err(KeyError::BadPem(f.display().to_string()));
            };
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(KeyError::NoKey);
        }
        let allowed: Vec<Algorithm> = if cfg.algorithms.is_empty() {
            [
                Algorithm::HS256,
                Algorithm::HS384,
                Algorithm::HS512,
                Algorithm::RS256,
                Algorithm::ES256,
                Algorithm::EdDSA,
            ]
            .into_iter()
            .filter(|a| keys.iter().any(|(f, _)| Some(*f) == family(*a)))
            .collect()
        } else {
            let mut v = Vec::new();
            for name in &cfg.algorithms {
                let a = parse_algorithm(name).ok_or_else(|| KeyError::NoKeyFor(name.clone()))?;
                if !keys.iter().any(|(f, _)| Some(*f) == family(a)) {
                    return Err(KeyError::NoKeyFor(name.clone()));
                }
                v.push(a);
            }
            v
        };
        Ok(Self {
            keys,
            allowed,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway.as_secs(),
        })
    }

    /// Verifies a token and returns the identity it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if !self.allowed.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        let fam = family(header.alg).ok_or(AuthError::Algorithm)?;
        let key = self
            .keys
            .iter()
            .find(|(f, _)| *f == fam)
            .map(|(_, k)| k)
            .ok_or(AuthError::Algorithm)?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        match &self.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Some(i) = &self.issuer {
            v.set_issuer(&[i]);
            v.required_spec_claims.insert("iss".into());
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidSignature => AuthError::Signature,
                K::InvalidAlgorithm | K::InvalidAlgorithmName => AuthError::Algorithm,
                K::MissingRequiredClaim(c) if c == "exp" => AuthError::MissingClaim("exp"),
                K::MissingRequiredClaim(c) if c == "sub" => AuthError::MissingClaim("sub"),
                K::InvalidIssuer | K::InvalidAudience | K::MissingRequiredClaim(_) => {
                    AuthError::Claims
                }
                _ => AuthError::Malformed,
            }
        })?;
        let sub = data.claims.sub.ok_or(AuthError::MissingClaim("sub"))?;
        if sub.is_empty() || sub.len() > 256 || sub.chars().any(char::is_control) {
            return Err(AuthError::Malformed);
        }
        let exp = data.claims.exp.ok_or(AuthError::MissingClaim("exp"))?;
        Ok(Identity {
            subject: Arc::from(sub),
            expires_at: exp,
        })
    }
}

/// Seconds since the UNIX epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A signing key for `herald token mint` and dev mode.
pub struct Signer {
    alg: Algorithm,
    key: EncodingKey,
}

impl Signer {
    /// An HMAC signer (HS256/384/512).
    pub fn hmac(alg: Algorithm, secret: &[u8]) -> Self {
        Self {
            alg,
            key: EncodingKey::from_secret(secret),
        }
    }

    /// A signer from a PEM private key; `alg` picks how to read it.
    pub fn from_pem(alg: Algorithm, pem: &[u8]) -> Result<Self, String> {
        let key = match family(alg) {
            Some(Family::Rsa) => EncodingKey::from_rsa_pem(pem),
            Some(Family::Ec) => EncodingKey::from_ec_pem(pem),
            Some(Family::Ed) => EncodingKey::from_ed_pem(pem),
            _ => return Err(format!("{alg:?} does not use a PEM private key")),
        }
        .map_err(|e| format!("cannot read the private key: {e}"))?;
        Ok(Self { alg, key })
    }

    /// Mints a token for `sub` valid for `ttl`, with optional `iss`/`aud`.
    pub fn mint(
        &self,
        sub: &str,
        ttl: Duration,
        iss: Option<&str>,
        aud: Option<&str>,
    ) -> Result<String, String> {
        let now = unix_now();
        let mut claims = serde_json::json!({"sub": sub, "iat": now, "exp": now + ttl.as_secs()});
        if let Some(i) = iss {
            claims["iss"] = i.into();
        }
        if let Some(a) = aud {
            claims["aud"] = a.into();
        }
        jsonwebtoken::encode(&Header::new(self.alg), &claims, &self.key).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        Verifier::from_config(&AuthConfig {
            hs_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let t = Signer::hmac(Algorithm::HS256, SECRET.as_bytes())
            .mint("alice", Duration::from_secs(60), None, None)
            .unwrap();
        let id = verifier().verify(&t).unwrap();
        assert_eq!(&*id.subject, "alice");
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
        assert!(v.verify(&none).is_err());
        assert!(matches!(v.verify("garbage"), Err(AuthError::Malformed)));
        let expired = Signer::hmac(Algorithm::HS256, SECRET.as_bytes());
        let claims = serde_json::json!({"sub": "a", "exp": unix_now() - 3600});
        let t =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &expired.key).unwrap();
        assert!(matches!(v.verify(&t), Err(AuthError::Expired)));
        let other = Signer::hmac(Algorithm::HS256, b"another-secret-another-secret-xx")
            .mint("a", Duration::from_secs(60), None, None)
            .unwrap();
        assert!(matches!(v.verify(&other), Err(AuthError::Signature)));
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "a"}),
            &expired.key,
        )
        .unwrap();
        assert!(matches!(
            v.verify(&no_exp),
            Err(AuthError::MissingClaim("exp"))
        ));
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
    }
}
