//! Verification keys: one PEM or secret, or a JSON Web Key Set (RFC 7517).
//!
//! Every key is checked before it is kept, so that verifying with it cannot
//! fail in ways a token could exploit: an Ed25519 key of exactly 32 bytes, a
//! P-256 point, an RSA modulus of at least 2048 bits, never a private key.
//! A key set is read key by key: one unusable key is reported and skipped,
//! the others serve. Symmetric (`oct`) keys are never taken from a key set.

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::Value;

use super::KeyError;

/// Most keys one set may hold: providers publish a handful.
pub const MAX_KEYS: usize = 64;

/// One verification key.
#[derive(Clone)]
pub struct Key {
    /// Its `kid`, for keys of a set; `None` for a configured PEM or secret
    /// (which verifies whatever `kid` a token names).
    pub kid: Option<String>,
    /// The family it verifies.
    pub family: AlgorithmFamily,
    /// The one algorithm it may verify, when its JWK says (`alg`).
    pub alg: Option<Algorithm>,
    /// The key.
    pub key: DecodingKey,
}

impl Key {
    /// Whether this key may verify a token signed with `alg`.
    pub fn verifies(&self, alg: Algorithm) -> bool {
        self.family == alg.family() && self.alg.is_none_or(|a| a == alg)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

fn rsa_bits(n_b64: &str) -> Option<usize> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(n_b64.trim_end_matches('=').as_bytes())
        .ok()
        .map(|n| n.iter().skip_while(|b| **b == 0).count() * 8)
}

/// Checks a public key of any family; `why` the first problem.
fn check_public(key: &DecodingKey) -> Result<(), &'static str> {
    match key.family() {
        AlgorithmFamily::Ed => {
            if key.try_get_as_bytes().map(<[u8]>::len).ok() != Some(32) {
                return Err("an Ed25519 public key is 32 bytes");
            }
        }
        AlgorithmFamily::Ec => {
            if key.try_get_as_bytes().map(<[u8]>::len).ok() != Some(65) {
                return Err("only P-256 keys are accepted (ES256)");
            }
        }
        AlgorithmFamily::Rsa => {
            let bits = Jwk::from_decoding_key(key, None)
                .ok()
                .and_then(|j| match j.algorithm {
                    AlgorithmParameters::RSA(p) => rsa_bits(&p.n),
                    _ => None,
                });
            if bits.is_none_or(|b| b < 2048) {
                return Err("RSA keys must have at least 2048 bits");
            }
        }
        _ => return Err("not a public key of RSA, EC (P-256) or Ed25519"),
    }
    Ok(())
}

/// A public key from a PEM file.
pub fn public_key_from_pem(name: &str, pem: &[u8]) -> Result<Key, KeyError> {
    if std::str::from_utf8(pem).is_ok_and(|t| t.contains("PRIVATE KEY")) {
        return Err(KeyError::UnusableKey(
            name.to_owned(),
            "is a private key; give herald the public key",
        ));
    }
    let key = DecodingKey::from_rsa_pem(pem)
        .or_else(|_| DecodingKey::from_ec_pem(pem))
        .or_else(|_| DecodingKey::from_ed_pem(pem))
        .map_err(|_| KeyError::BadPem(name.to_owned()))?;
    check_public(&key).map_err(|why| KeyError::UnusableKey(name.to_owned(), why))?;
    Ok(Key {
        kid: None,
        family: key.family(),
        alg: None,
        key,
    })
}

/// A set read from JWKS JSON: the keys that are usable, and why the others
/// are not (`kid` or position, and the reason).
#[derive(Debug, Default)]
pub struct ParsedSet {
    /// Usable keys.
    pub keys: Vec<Key>,
    /// One line per key skipped.
    pub skipped: Vec<String>,
}

/// Why a JWKS document as a whole cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("not a JSON object with a \"keys\" array")]
    Shape,
    #[error("holds more than {MAX_KEYS} keys")]
    TooMany,
    #[error("holds no usable key ({0})")]
    NoUsableKey(String),
}

fn accepted(alg: &KeyAlgorithm) -> Option<Algorithm> {
    match alg {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// One JWK, checked: `use` (when given) is `sig`, `key_ops` (when given)
/// holds `verify`, `alg` (when given) is one herald accepts and of the
/// key's type, the curve is P-256 or Ed25519, RSA is 2048 bits or more.
fn key_from_jwk(value: &Value) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_value(value.clone())
        .map_err(|e| format!("not a JWK herald reads: {e}"))?;
    let c = &jwk.common;
    if let Some(u) = &c.public_key_use {
        if *u != PublicKeyUse::Signature {
            return Err("its \"use\" is not \"sig\"".into());
        }
    }
    if let Some(ops) = &c.key_operations {
        if !ops
            .iter()
            .any(|o| matches!(o, jsonwebtoken::jwk::KeyOperations::Verify))
        {
            return Err("its \"key_ops\" do not include \"verify\"".into());
        }
    }
    let alg = match &c.key_algorithm {
        None => None,
        Some(a) => Some(accepted(a).ok_or_else(|| format!("its alg {a:?} is not accepted"))?),
    };
    match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric keys are never taken from a key set".into());
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve != EllipticCurve::P256 => {
            return Err("only P-256 EC keys are accepted".into());
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve != EllipticCurve::Ed25519 => {
            return Err("only Ed25519 OKP keys are accepted".into());
        }
        _ => {}
    }
    // JWK members are public-key members only: a private part is refused.
    if value.get("d").is_some() || value.get("p").is_some() {
        return Err("holds a private key".into());
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable: {e}"))?;
    check_public(&key)?;
    if let Some(a) = alg {
        if a.family() != key.family() {
            return Err(format!("its alg {a:?} does not fit its key type"));
        }
    }
    Ok(Key {
        kid: c.key_id.clone(),
        family: key.family(),
        alg,
        key,
    })
}

/// Reads a JWKS document key by key.
pub fn parse_set(bytes: &[u8]) -> Result<ParsedSet, SetError> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|_| SetError::Shape)?;
    let items = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(SetError::Shape)?;
    if items.len() > MAX_KEYS {
        return Err(SetError::TooMany);
    }
    let mut set = ParsedSet::default();
    for (i, item) in items.iter().enumerate() {
        let name = item
            .get("kid")
            .and_then(Value::as_str)
            .map_or_else(|| format!("keys[{i}]"), |k| format!("kid {k:?}"));
        match key_from_jwk(item) {
            Ok(k) => {
                let twin = set
                    .keys
                    .iter()
                    .any(|o| o.kid == k.kid && o.family == k.family);
                if twin {
                    set.skipped
                        .push(format!("{name}: a key of that kid and type came earlier"));
                } else {
                    set.keys.push(k);
                }
            }
            Err(why) => set.skipped.push(format!("{name}: {why}")),
        }
    }
    if set.keys.is_empty() {
        let why = if set.skipped.is_empty() {
            "the set is empty".to_owned()
        } else {
            set.skipped.join("; ")
        };
        return Err(SetError::NoUsableKey(why));
    }
    Ok(set)
}

/// The candidates in `keys` for a token signed with `alg` naming `kid`.
/// Configured keys (a PEM, a secret) verify whatever `kid` a token names.
/// Of a set: the key of that `kid`; for a token without `kid`, the set's
/// keys without one, or its only key for `alg`. A token is never tried
/// against every key of a set.
pub fn candidates<'a>(
    keys: &'a [Key],
    alg: Algorithm,
    kid: Option<&str>,
    configured: bool,
) -> impl Iterator<Item = &'a Key> + 'a {
    let kid = kid.map(str::to_owned);
    let lone = match kid {
        _ if configured => None,
        Some(_) => None,
        None => {
            let mut of_set = keys.iter().filter(|k| k.kid.is_some() && k.verifies(alg));
            match (of_set.next(), of_set.next()) {
                (Some(only), None) => Some(only),
                _ => None,
            }
        }
    };
    keys.iter()
        .filter(move |k| {
            k.verifies(alg)
                && (configured
                    || match (&k.kid, &kid) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a == b,
                        _ => false,
                    })
        })
        .chain(lone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rsa_jwk(kid: &str) -> Value {
        let pem = include_bytes!("../../tests/fixtures/rsa_public.pem");
        let key = DecodingKey::from_rsa_pem(pem).unwrap();
        let mut v = serde_json::to_value(Jwk::from_decoding_key(&key, None).unwrap()).unwrap();
        v["kid"] = kid.into();
        v
    }

    #[test]
    fn one_bad_key_does_not_discard_the_others() {
        let mut weird_use = rsa_jwk("enc");
        weird_use["use"] = "enc".into();
        let mut wrong_alg = rsa_jwk("es");
        wrong_alg["alg"] = "ES256".into();
        let mut hs = rsa_jwk("hs");
        hs["alg"] = "HS256".into();
        let mut private = rsa_jwk("priv");
        private["d"] = "AAAA".into();
        let doc = json!({"keys": [
            rsa_jwk("good"),
            weird_use,
            wrong_alg,
            hs,
            private,
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"},
            {"kty": "nonsense"},
            "not an object",
            rsa_jwk("good"),
        ]});
        let set = parse_set(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kid.as_deref(), Some("good"));
        assert_eq!(set.skipped.len(), 10, "{:?}", set.skipped);
    }

    #[test]
    fn a_set_without_usable_keys_or_shape_is_an_error() {
        for bad in [
            "".to_owned(),
            "[]".into(),
            json!({"keys": {}}).to_string(),
            json!({"keys": []}).to_string(),
            json!({"keys": [{"kty": "oct", "k": "AAAA"}]}).to_string(),
            json!({"keys": vec![rsa_jwk("x"); MAX_KEYS + 1]}).to_string(),
        ] {
            assert!(parse_set(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn candidates_match_kid_and_alg_and_never_every_key() {
        let set = parse_set(
            json!({"keys": [rsa_jwk("a"), rsa_jwk("b")]})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
        .keys;
        let kids = |kid: Option<&str>, alg| {
            candidates(&set, alg, kid, false)
                .map(|k| k.kid.clone().unwrap_or_default())
                .collect::<Vec<_>>()
        };
        assert_eq!(kids(Some("b"), Algorithm::RS256), ["b"]);
        assert!(kids(Some("c"), Algorithm::RS256).is_empty());
        assert!(kids(Some("a"), Algorithm::ES256).is_empty());
        assert!(
            kids(None, Algorithm::RS256).is_empty(),
            "two keys: no guess"
        );
        let one = &set[..1];
        assert_eq!(candidates(one, Algorithm::RS256, None, false).count(), 1);
        // A set's key without kid is not a key for every kid.
        let mut bare = set[0].clone();
        bare.kid = None;
        let bare = [bare];
        assert_eq!(
            candidates(&bare, Algorithm::RS256, Some("x"), false).count(),
            0
        );
        assert_eq!(candidates(&bare, Algorithm::RS256, None, false).count(), 1);
        // A configured key is, whatever the kid.
        assert_eq!(
            candidates(&bare, Algorithm::RS256, Some("x"), true).count(),
            1
        );
        assert_eq!(
            candidates(&bare, Algorithm::ES256, Some("x"), true).count(),
            0
        );
    }
}
