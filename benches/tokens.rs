//! What verifying a bearer token costs per request, with key sets loaded
//! (cached): a configured HS256 secret, RS256 / ES256 / EdDSA keys from a
//! JWKS (found by `kid` in sets of 1 and 32 keys), the issuer picked among
//! 8 blocks, and a token naming an unknown `kid` refused while refreshes
//! are rate-limited (the flood case).
//!
//! Run: `cargo bench --bench tokens`

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use jsonwebtoken::Algorithm;
use serde_json::json;

use herald::auth::{unix_now, Verifier};
use herald::config::AuthConfig;

#[path = "../tests/common/mod.rs"]
mod common;

use common::idp::TestKey;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";

fn sign(k: &TestKey, kid: &str, iss: &str) -> String {
    let now = unix_now();
    k.sign_as(
        Some(kid),
        &json!({"sub": "bench", "iss": iss, "iat": now, "exp": now + 3600}),
    )
}

/// A JWKS file with `key` under `kid-0..n` (all the same key material:
/// lookup is by kid, so the cost is the same as distinct keys).
fn jwks_file(dir: &std::path::Path, name: &str, keys: &[(&TestKey, usize)]) -> std::path::PathBuf {
    let mut all = Vec::new();
    for (k, n) in keys {
        for i in 0..*n {
            let mut j = k.jwk();
            j["kid"] = format!("{}-{i}", j["kty"].as_str().unwrap_or("k")).into();
            all.push(j);
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, json!({"keys": all}).to_string()).unwrap();
    path
}

/// A verifier whose key sets are loaded, and not refreshed again while the
/// bench runs (a refresh reads a file, which a benchmark loop cannot await).
fn loaded(rt: &tokio::runtime::Runtime, cfg: &AuthConfig) -> Verifier {
    let day = Duration::from_secs(24 * 3600);
    let mut cfg = cfg.clone();
    for block in cfg.issuers.iter_mut() {
        (block.refresh_interval, block.min_refresh_interval) = (day, day);
    }
    if cfg.issuers.is_empty() {
        (cfg.refresh_interval, cfg.min_refresh_interval) = (day, day);
    }
    let v = Verifier::from_config(&cfg).unwrap();
    rt.block_on(async {
        let _tasks = v.run(std::future::pending::<()>);
        while !v.key_sets_fresh() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    v
}

fn verify(v: &Verifier, token: &str) -> bool {
    v.verify(black_box(token))
        .now_or_never()
        .expect("loaded key sets never wait")
        .is_ok()
}

fn tokens(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (rsa, ec, ed) = (
        TestKey::new("rsa", "-"),
        TestKey::new("ec", "-"),
        TestKey::new("ed", "-"),
    );

    let hs = loaded(
        &rt,
        &AuthConfig {
            hs_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        },
    );
    let hs_token = herald::auth::Signer::hmac(Algorithm::HS256, SECRET.as_bytes())
        .unwrap()
        .mint("bench", Duration::from_secs(3600), None, None)
        .unwrap();
    assert!(verify(&hs, &hs_token));
    c.bench_function("tokens/hs256_configured_secret", |b| {
        b.iter(|| verify(&hs, &hs_token))
    });

    let one = loaded(
        &rt,
        &AuthConfig {
            issuer: Some("https://idp".into()),
            jwks_file: Some(jwks_file(
                dir.path(),
                "one.json",
                &[(&rsa, 1), (&ec, 1), (&ed, 1)],
            )),
            ..AuthConfig::default()
        },
    );
    for (name, k, kid) in [
        ("tokens/rs256_jwks", &rsa, "RSA-0"),
        ("tokens/es256_jwks", &ec, "EC-0"),
        ("tokens/eddsa_jwks", &ed, "OKP-0"),
    ] {
        let t = sign(k, kid, "https://idp");
        assert!(verify(&one, &t), "{name}");
        c.bench_function(name, |b| b.iter(|| verify(&one, &t)));
    }

    let big = loaded(
        &rt,
        &AuthConfig {
            issuer: Some("https://idp".into()),
            jwks_file: Some(jwks_file(dir.path(), "big.json", &[(&ec, 32)])),
            ..AuthConfig::default()
        },
    );
    let last = sign(&ec, "EC-31", "https://idp");
    assert!(verify(&big, &last));
    c.bench_function("tokens/es256_jwks_32_keys_last_kid", |b| {
        b.iter(|| verify(&big, &last))
    });

    let blocks: Vec<AuthConfig> = (0..8)
        .map(|i| AuthConfig {
            issuer: Some(format!("https://idp-{i}")),
            identity_prefix: format!("idp{i}:"),
            jwks_file: Some(jwks_file(dir.path(), &format!("b{i}.json"), &[(&ec, 1)])),
            ..AuthConfig::default()
        })
        .collect();
    let many = loaded(
        &rt,
        &AuthConfig {
            issuers: blocks,
            ..AuthConfig::default()
        },
    );
    let t = sign(&ec, "EC-0", "https://idp-7");
    assert!(verify(&many, &t));
    c.bench_function("tokens/es256_issuer_8_of_8", |b| {
        b.iter(|| verify(&many, &t))
    });

    // Unknown kids while refreshes are rate-limited: the refusal's cost.
    let forged = sign(&ec, "forged", "https://idp");
    assert!(!verify(&big, &forged));
    c.bench_function("tokens/unknown_kid_refused_rate_limited", |b| {
        b.iter(|| verify(&big, &forged))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = tokens
}
criterion_main!(benches);
