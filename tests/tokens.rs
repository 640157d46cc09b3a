//! Tokens from identity providers: key sets that rotate, several issuers,
//! claim mapping, roles from claims, introspection. The provider is a real
//! HTTP server on loopback (`common::idp`), the keys are real RSA, P-256 and
//! Ed25519 keys, and herald is the real binary.

mod common;

use std::time::{Duration, Instant};

use common::idp::{claims, jwks, Idp, TestCa, TestKey};
use common::{event, registration, token_for, Herald, HeraldBuilder, SECRET, WAIT};
use serde_json::{json, Value};

fn body() -> Value {
    registration("p1", "secret:updated", None, None)
}

/// Status and `details.reason` of a subscribe with `token` (the stream, if
/// one opened, is dropped).
async fn attempt(h: &Herald, token: &str) -> (u16, String) {
    let r = h.subscribe_raw(Some(token), &body()).await;
    let status = r.status().as_u16();
    if status == 200 {
        return (200, String::new());
    }
    let v: Value = r.json().await.unwrap_or_default();
    let reason = v["error"]["details"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, reason)
}

async fn publish_one(h: &Herald, path: &str) {
    let r = h
        .publish_raw(
            &token_for("dev-publisher", Duration::from_secs(60)),
            &event("secret:updated", "p1", "prod", path),
        )
        .await;
    assert_eq!(r.status(), 202);
}

/// Policy: the shipped roles, and grants to the prefixed identities below.
fn policy() -> String {
    let shipped = std::fs::read_to_string(common::repo_path("policies/policy.csv")).unwrap();
    format!(
        "{shipped}\ng, a:alice, role:reader, *\ng, b:bob, role:reader, *\ng, kit:plain, role:reader, *\n\
         g, kit:dev-publisher, role:publisher, *\ng, strict:dev-subscriber, role:reader, *\n\
         g, lenient:dev-subscriber, role:reader, *\n"
    )
}

/// herald, with limits out of the way of quick repeated subscribes.
fn builder() -> HeraldBuilder {
    HeraldBuilder::new()
        .env("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "1000")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY", "1000")
        .env("LIMITS__SUBSCRIBE_RATE", "10000")
        .env("LIMITS__SUBSCRIBE_BURST", "10000")
}

/// Blocks every test here shares: tokens without `iss` (the test kit's
/// HS256 publisher, as `kit:dev-publisher`) and the given ones.
fn config(blocks: &str) -> String {
    format!(
        "[auth]\n[[auth.issuers]]\nhs_secret = \"{SECRET}\"\nidentity_prefix = \"kit:\"\nrequire_exp = false\nmax_token_age = \"1h\"\n\n{blocks}"
    )
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_a_flood_of_unknown_kids_is_rate_limited() {
    let k1 = TestKey::new("rsa", "k1");
    let k2 = TestKey::new("ec", "k2");
    let idp = Idp::start(jwks(&[&k1])).await;
    let iss = "https://idp.test/a";
    let h = builder()
        .policy(&policy())
        .config(&config(&format!(
            "[[auth.issuers]]\nissuer = \"{iss}\"\njwks_url = \"{}\"\nidentity_prefix = \"a:\"\nmin_refresh_interval = \"2s\"\n",
            idp.url("/jwks")
        )))
        .start();
    h.wait_ready(200).await;
    let loaded = idp.jwks_hits();
    assert_eq!(loaded, 1, "the set is loaded once at start");

    // A stream verified with k1.
    let mut live = h
        .subscribe(&k1.sign(&claims(Some(iss), "alice")), &body())
        .await;

    // The provider rotates to k2 alone: the first token naming k2 refreshes
    // the set (once; the rate limit allows one per 2 s, so retry until it did).
    idp.set_jwks(jwks(&[&k2]));
    let t2 = k2.sign(&claims(Some(iss), "alice"));
    common::eventually(WAIT, "a k2 token is accepted after one refresh", || async {
        (attempt(&h, &t2).await.0 == 200).then_some(())
    })
    .await;
    assert!(idp.jwks_hits() > loaded);

    // k1 left the set: new connections with it are refused, the stream it
    // verified keeps running until its token expires.
    assert_eq!(
        attempt(&h, &k1.sign(&claims(Some(iss), "alice"))).await,
        (401, "unknown_key".into())
    );
    publish_one(&h, "/after-rotation").await;
    assert_eq!(
        live.next_event().await.json()["secretpath"],
        "/after-rotation"
    );

    // A flood of made-up kids, arriving while the one refresh they may
    // cause is slow: every one refused, one request to the provider.
    idp.delay_jwks(Duration::from_millis(400));
    tokio::time::sleep(Duration::from_millis(2100)).await; // past min_refresh_interval
    let before = idp.jwks_hits();
    let started = Instant::now();
    let attempts = (0..60).map(|i| {
        let t = k2.sign_as(Some(&format!("forged-{i}")), &claims(Some(iss), "alice"));
        let h = &h;
        async move { attempt(h, &t).await }
    });
    for got in futures_util::future::join_all(attempts).await {
        assert_eq!(got, (401, "unknown_key".into()));
    }
    let windows = (started.elapsed().as_secs_f64() / 2.0).floor() as usize;
    let refreshes = idp.jwks_hits() - before;
    assert!(
        (1..=windows + 1).contains(&refreshes),
        "{refreshes} refreshes in {:?}",
        started.elapsed()
    );
    eprintln!(
        "60 unknown kids at once, refresh slowed to 400 ms: {refreshes} provider request(s), all refused in {:?}",
        started.elapsed()
    );
    // The stream verified before all this still runs.
    publish_one(&h, "/after-flood").await;
    assert_eq!(live.next_event().await.json()["secretpath"], "/after-flood");
}

#[tokio::test]
async fn a_failing_refresh_keeps_the_last_good_set_until_it_is_too_old() {
    let k1 = TestKey::new("ed", "k1");
    let idp = Idp::start(jwks(&[&k1])).await;
    let iss = "https://idp.test/ed";
    let h = builder()
        .policy(&policy())
        .config(&config(&format!(
            "[[auth.issuers]]\nissuer = \"{iss}\"\njwks_url = \"{}\"\nidentity_prefix = \"a:\"\nrefresh_interval = \"1s\"\nmin_refresh_interval = \"1s\"\nmax_key_age = \"6s\"\n",
            idp.url("/jwks")
        )))
        .start();
    h.wait_ready(200).await;
    let token = k1.sign(&claims(Some(iss), "alice"));
    assert_eq!(attempt(&h, &token).await.0, 200, "EdDSA from a JWKS");

    idp.fail_jwks(true);
    let failed = "herald_key_set_refreshes_total{issuer=\"https://idp.test/ed\",result=\"failed\"}";
    common::eventually(WAIT, "a refresh fails", || async {
        (h.metric(failed).await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(attempt(&h, &token).await.0, 200, "the last good set serves");
    let (_, ready) = h.admin_json("/readyz").await;
    assert_eq!(ready["checks"]["key_sets"], true, "{ready}");

    // Older than max_key_age: not ready, still serving what it has.
    h.wait_ready(503).await;
    let (_, ready) = h.admin_json("/readyz").await;
    assert_eq!(ready["checks"]["key_sets"], false, "{ready}");
    assert_eq!(attempt(&h, &token).await.0, 200);

    idp.fail_jwks(false);
    h.wait_ready(200).await;
}

#[tokio::test]
async fn issuers_are_kept_apart_even_when_their_kids_collide() {
    let a_key = TestKey::new("rsa", "shared");
    let b_key = TestKey::new("rsa2", "shared");
    let b_ec = TestKey::new("ec", "b-ec");
    let idp_a = Idp::start(jwks(&[&a_key])).await;
    let idp_b = Idp::start(jwks(&[&b_key, &b_ec])).await;
    // Issuer B is found by discovery: its issuer is its base URL.
    let (iss_a, iss_b) = ("https://idp.test/a".to_owned(), idp_b.base());
    idp_b.discovery(&iss_b);
    let h = builder()
        .policy(&policy())
        .config(&config(&format!(
            "[[auth.issuers]]\nissuer = \"{iss_a}\"\njwks_url = \"{}\"\nidentity_prefix = \"a:\"\naudience = \"herald\"\n\n\
             [[auth.issuers]]\nissuer = \"{iss_b}\"\ndiscovery = true\nidentity_prefix = \"b:\"\nidentity_claim = \"userId\"\n",
            idp_a.url("/jwks")
        )))
        .start();
    h.wait_ready(200).await;
    let with_aud = |iss: &str, sub: &str| {
        let mut c = claims(Some(iss), sub);
        c["aud"] = "herald".into();
        c
    };
    let as_user = |iss: &str, user: &str| {
        let mut c = claims(Some(iss), "ignored");
        c["userId"] = user.into();
        c
    };
    let cases: Vec<(&str, String, (u16, &str))> = vec![
        (
            "A's token, A's key",
            a_key.sign(&with_aud(&iss_a, "alice")),
            (200, ""),
        ),
        (
            "B's token, B's key (discovery, userId)",
            b_key.sign(&as_user(&iss_b, "bob")),
            (200, ""),
        ),
        (
            "B's P-256 key",
            b_ec.sign(&as_user(&iss_b, "bob")),
            (200, ""),
        ),
        (
            "A's iss, B's key of the same kid",
            b_key.sign(&with_aud(&iss_a, "alice")),
            (401, "signature"),
        ),
        (
            "B's iss, A's key of the same kid",
            a_key.sign(&as_user(&iss_b, "bob")),
            (401, "signature"),
        ),
        (
            "A's iss, a kid only B publishes",
            b_ec.sign(&with_aud(&iss_a, "alice")),
            (401, "unknown_key"),
        ),
        (
            "B's iss, B's EC kid on an RSA token",
            a_key.sign_as(Some("b-ec"), &as_user(&iss_b, "bob")),
            (401, "unknown_key"),
        ),
        (
            "an issuer nobody configured",
            a_key.sign(&with_aud("https://evil.test", "alice")),
            (401, "issuer"),
        ),
        (
            "A's token without its audience",
            a_key.sign(&claims(Some(&iss_a), "alice")),
            (401, "missing_claim"),
        ),
        (
            "prefix: a:bob has no grant",
            a_key.sign(&with_aud(&iss_a, "bob")),
            (403, ""),
        ),
        (
            "B's token without its identity claim",
            b_key.sign(&claims(Some(&iss_b), "bob")),
            (401, "missing_claim"),
        ),
        (
            "A's token without exp (A requires it)",
            {
                let mut c = with_aud(&iss_a, "alice");
                c.as_object_mut().unwrap().remove("exp");
                a_key.sign(&c)
            },
            (401, "missing_claim"),
        ),
    ];
    for (what, token, (status, reason)) in cases {
        let got = attempt(&h, &token).await;
        assert_eq!(got.0, status, "{what}: {got:?}");
        if !reason.is_empty() {
            assert_eq!(got.1, reason, "{what}");
        }
    }

    // The block without issuer takes tokens without iss (HS256 here), and
    // there exp may be absent: they live max_token_age from iat.
    let hs = herald::auth::Signer::hmac(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes()).unwrap();
    let now = herald::auth::unix_now();
    assert_eq!(
        attempt(&h, &hs.sign(&json!({"sub": "plain", "iat": now})).unwrap())
            .await
            .0,
        200
    );
    assert_eq!(
        attempt(
            &h,
            &hs.sign(&json!({"sub": "plain", "iat": now - 7200}))
                .unwrap()
        )
        .await,
        (401, "expired".into())
    );
    assert_eq!(
        attempt(&h, &hs.sign(&json!({"sub": "plain"})).unwrap()).await,
        (401, "missing_claim".into())
    );
    // An HS token claiming issuer A is not A's: A holds no secret.
    assert_eq!(
        attempt(&h, &hs.sign(&with_aud(&iss_a, "alice")).unwrap()).await,
        (401, "algorithm".into())
    );
    // Discovery was asked once, and the JWKS it named once.
    assert_eq!((idp_b.discovery_hits(), idp_b.jwks_hits()), (1, 1));
}

#[tokio::test]
async fn roles_come_from_a_mapped_claim_and_only_from_it() {
    let key = TestKey::new("rsa", "k1");
    let idp = Idp::start(jwks(&[&key])).await;
    let iss = "https://idp.test/groups";
    let h = builder()
        .policy(&format!(
            "{}p, g:dana, p1, secret:*, subscribe, *, /internal/**, deny\n",
            policy()
        ))
        .config(&config(&format!(
            "[[auth.issuers]]\nissuer = \"{iss}\"\njwks_url = \"{}\"\nidentity_prefix = \"g:\"\nroles_claim = \"groups\"\n\
             roles = {{ \"herald-readers\" = \"role:reader\", \"ops\" = \"role:admin\" }}\n",
            idp.url("/jwks")
        )))
        .start();
    h.wait_ready(200).await;
    let with_groups = |sub: &str, groups: Value| {
        let mut c = claims(Some(iss), sub);
        c["groups"] = groups;
        key.sign(&c)
    };
    assert_eq!(
        attempt(&h, &with_groups("carol", json!(["herald-readers"])))
            .await
            .0,
        200
    );
    assert_eq!(
        attempt(&h, &with_groups("carol", json!("herald-readers")))
            .await
            .0,
        200
    );
    for (groups, what) in [
        (json!([]), "no group"),
        (
            json!(["role:reader", "readers"]),
            "unmapped values, even role-shaped",
        ),
    ] {
        assert_eq!(
            attempt(&h, &with_groups("carol", groups)).await.0,
            403,
            "{what}"
        );
    }
    assert_eq!(
        attempt(&h, &with_groups("carol", json!([1]))).await,
        (401, "claim_type".into())
    );
    // A claimed role's rules apply with the identity's own: dana's deny wins
    // over role:admin's allow.
    let dana = with_groups("dana", json!(["ops"]));
    let mut s = h.subscribe(&dana, &body()).await;
    publish_one(&h, "/internal/x").await;
    publish_one(&h, "/visible").await;
    assert!(s.paths_until("/visible").await.is_empty(), "the deny held");
    let (_, conns) = h.admin_json("/admin/connections").await;
    let dana_view = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "g:dana")
        .cloned()
        .unwrap_or_default();
    assert_eq!(dana_view["roles"], json!(["role:admin"]), "{conns}");
}

#[tokio::test]
async fn introspection_allows_denies_fails_as_configured_and_ends_revoked_streams() {
    let idp = Idp::start(json!({"keys": []})).await;
    idp.require_client("herald", "s3cret");
    let block = |iss: &str, extra: &str| {
        let prefix = iss.rsplit('/').next().unwrap_or_default();
        format!("[[auth.issuers]]\nissuer = \"{iss}\"\nhs_secret = \"{SECRET}\"\nidentity_prefix = \"{prefix}:\"\n{extra}\n")
    };
    let strict = block(
        "https://idp.test/strict",
        &format!(
            "[auth.issuers.introspection]\nurl = \"{}\"\nclient_id = \"herald\"\nclient_secret = \"s3cret\"\ncache_ttl = \"1s\"\nnegative_ttl = \"1s\"\ntimeout = \"1s\"\n",
            idp.url("/introspect")
        ),
    );
    let lenient = block(
        "https://idp.test/lenient",
        &format!(
            "[auth.issuers.introspection]\nurl = \"{}\"\nmethod = \"bearer\"\ncache_ttl = \"1s\"\non_failure = \"use_cached\"\nmax_stale = \"1m\"\n",
            idp.url("/check")
        ),
    );
    let h = builder()
        .policy(&policy())
        .config(&config(&format!("{strict}\n{lenient}")))
        .start();
    let hs = herald::auth::Signer::hmac(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes()).unwrap();
    let token = |iss: &str, n: u32| {
        let mut c = claims(Some(iss), "dev-subscriber");
        c["jti"] = n.into();
        hs.sign(&c).unwrap()
    };
    let (strict_iss, lenient_iss) = ("https://idp.test/strict", "https://idp.test/lenient");

    // Allow, and deny (RFC 7662 with client credentials; bearer check).
    let strict_known = token(strict_iss, 1);
    assert_eq!(attempt(&h, &strict_known).await.0, 200);
    let known_lenient = token(lenient_iss, 1);
    assert_eq!(attempt(&h, &known_lenient).await.0, 200);
    let revoked = token(strict_iss, 2);
    idp.revoke(&revoked);
    assert_eq!(attempt(&h, &revoked).await, (401, "inactive".into()));
    let revoked_b = token(lenient_iss, 2);
    idp.revoke(&revoked_b);
    assert_eq!(attempt(&h, &revoked_b).await, (401, "inactive".into()));

    // A live stream whose token is revoked ends with token_revoked.
    let live_token = token(strict_iss, 3);
    let mut live = h.subscribe(&live_token, &body()).await;
    idp.revoke(&live_token);
    let end = live.next_event().await;
    assert_eq!(end.event.as_deref(), Some("error"));
    assert_eq!(end.json()["code"], "token_revoked");

    // The provider goes down. refuse: 503, never a guess; use_cached: a
    // token it answered for keeps its answer, one it never saw is refused.
    idp.introspection_down(true);
    common::eventually(
        WAIT,
        "refused once its answer is older than cache_ttl",
        || async {
            let got = attempt(&h, &strict_known).await;
            (got != (200, String::new())).then_some(got)
        },
    )
    .await;
    assert_eq!(
        attempt(&h, &strict_known).await,
        (503, "provider_unavailable".into())
    );
    assert_eq!(
        attempt(&h, &known_lenient).await.0,
        200,
        "stale answer within max_stale"
    );
    assert_eq!(
        attempt(&h, &token(lenient_iss, 9)).await,
        (503, "provider_unavailable".into())
    );
    assert!(
        h.metric(
            "herald_introspections_total{issuer=\"https://idp.test/lenient\",result=\"stale\"}"
        )
        .await
            >= 1.0
    );

    // Cached answers spare the provider: while cached, a token is not
    // asked about again.
    idp.introspection_down(false);
    let t = token(strict_iss, 10);
    assert_eq!(attempt(&h, &t).await.0, 200);
    let cached =
        "herald_introspections_total{issuer=\"https://idp.test/strict\",result=\"cached\"}";
    let before = h.metric(cached).await;
    for _ in 0..5 {
        assert_eq!(attempt(&h, &t).await.0, 200);
    }
    assert!(
        h.metric(cached).await - before >= 3.0,
        "answered from the cache"
    );
    assert!(idp.check_hits() >= 2, "the bearer check was asked");

    // An answer that is not RFC 7662's ("active" not a boolean) is no
    // answer: refused as unavailable, never taken for active.
    idp.introspection_garbage(true);
    assert_eq!(
        attempt(&h, &token(strict_iss, 11)).await,
        (503, "provider_unavailable".into())
    );
}

#[tokio::test]
async fn https_key_sets_trust_only_the_configured_ca() {
    let key = TestKey::new("ec", "k1");
    let (ours, theirs) = (TestCa::new("ours"), TestCa::new("theirs"));
    let good = Idp::start_tls(jwks(&[&key]), &ours).await;
    let impostor = Idp::start_tls(jwks(&[&key]), &theirs).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ours.pem).unwrap();
    // Issuer t: our CA, our server. Issuer u: our CA, a server another CA
    // signed (a man in the middle). Issuer v: the system roots, which do not
    // hold a test CA.
    let block = |name: &str, idp: &Idp, ca_file: Option<&std::path::Path>| {
        let ca = ca_file.map_or_else(String::new, |p| {
            format!("ca_file = {:?}\n", p.display().to_string())
        });
        format!(
            "[[auth.issuers]]\nissuer = \"https://idp.test/{name}\"\njwks_url = \"{}\"\nidentity_prefix = \"{name}:\"\n{ca}\n",
            idp.url("/jwks")
        )
    };
    let h = builder()
        .policy(&format!("{}g, t:alice, role:reader, *\n", policy()))
        .config(&config(&format!(
            "{}{}{}",
            block("t", &good, Some(&ca)),
            block("u", &impostor, Some(&ca)),
            block("v", &good, None)
        )))
        .start();
    let loaded = "herald_key_set_refreshes_total{issuer=\"https://idp.test/t\",result=\"ok\"}";
    common::eventually(WAIT, "the set behind our CA loads", || async {
        (h.metric(loaded).await >= 1.0).then_some(())
    })
    .await;
    assert!(good.url("/jwks").starts_with("https://"));
    assert_eq!(
        attempt(&h, &key.sign(&claims(Some("https://idp.test/t"), "alice")))
            .await
            .0,
        200
    );
    for name in ["u", "v"] {
        let failed = format!("herald_key_set_refreshes_total{{issuer=\"https://idp.test/{name}\",result=\"failed\"}}");
        common::eventually(
            WAIT,
            format!("issuer {name}'s fetch is refused"),
            || async { (h.metric(&failed).await >= 1.0).then_some(()) },
        )
        .await;
        let token = key.sign(&claims(Some(&format!("https://idp.test/{name}")), "alice"));
        assert_eq!(
            attempt(&h, &token).await,
            (503, "provider_unavailable".into()),
            "issuer {name}: no set ever loaded"
        );
    }
    assert_eq!(impostor.jwks_hits(), 0, "no request reached the impostor");
    let (status, ready) = h.admin_json("/readyz").await;
    assert_eq!((status, &ready["checks"]["key_sets"]), (503, &json!(false)));
}

#[test]
fn config_print_redacts_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("herald.toml");
    std::fs::write(
        &cfg,
        format!(
            "[auth]\n[[auth.issuers]]\nissuer = \"https://a\"\nidentity_prefix = \"a:\"\nhs_secret = \"{SECRET}\"\n\
             [auth.issuers.introspection]\nurl = \"https://a/introspect\"\nclient_id = \"herald\"\nclient_secret = \"introspection-secret\"\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["config", "print", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains(SECRET) && !text.contains("introspection-secret"),
        "{text}"
    );
    assert_eq!(text.matches("<redacted>").count(), 2, "{text}");
}

#[test]
fn bad_issuer_configs_are_refused_with_the_key_named() {
    let cases = [
        ("[auth]\njwks_url = \"http://idp.example.com/jwks\"\n", "auth.jwks_url"),
        ("[auth]\ndiscovery = true\n", "auth.discovery"),
        ("[auth]\njwks_url = \"https://a/j\"\njwks_file = \"/x\"\n", "one key set"),
        (
            &format!("[auth]\nhs_secret = \"{SECRET}\"\n[[auth.issuers]]\nissuer = \"x\"\nhs_secret = \"{SECRET}\"\n"),
            "auth.issuers",
        ),
        (
            &format!("[auth]\n[[auth.issuers]]\nissuer = \"x\"\nhs_secret = \"{SECRET}\"\nidentity_prefix = \"x:\"\n[[auth.issuers]]\nissuer = \"x\"\nhs_secret = \"{SECRET}\"\nidentity_prefix = \"y:\"\n"),
            "two blocks",
        ),
        (
            &format!("[auth]\n[[auth.issuers]]\nissuer = \"x\"\nhs_secret = \"{SECRET}\"\n[[auth.issuers]]\nissuer = \"y\"\nhs_secret = \"{SECRET}\"\nidentity_prefix = \"y:\"\n"),
            "auth.identity_prefix",
        ),
        (
            // "a:" + "b:x" would be "a:b:" + "x".
            &format!("[auth]\n[[auth.issuers]]\nissuer = \"x\"\nhs_secret = \"{SECRET}\"\nidentity_prefix = \"a:\"\n[[auth.issuers]]\nissuer = \"y\"\nhs_secret = \"{SECRET}\"\nidentity_prefix = \"a:b:\"\n"),
            "auth.identity_prefix",
        ),
        (
            &format!("[auth]\nhs_secret = \"{SECRET}\"\n[auth.introspection]\nurl = \"https://a/i\"\non_failure = \"use_cached\"\nmax_stale = \"1s\"\n"),
            "auth.introspection.max_stale",
        ),
        (
            &format!("[auth]\nhs_secret = \"{SECRET}\"\nroles_claim = \"groups\"\nroles = {{ admins = \"admin\" }}\n"),
            "auth.roles",
        ),
        (
            &format!("[auth]\nhs_secret = \"{SECRET}\"\n[auth.introspection]\nurl = \"http://10.0.0.1/i\"\n"),
            "auth.introspection.url",
        ),
    ];
    for (toml, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("herald.toml");
        std::fs::write(&cfg, toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml}");
        assert!(err.contains(want), "{toml}\n{err}");
    }
}

#[tokio::test]
async fn a_discovery_document_naming_another_issuer_is_not_followed() {
    let key = TestKey::new("ec", "k1");
    let idp = Idp::start(jwks(&[&key])).await;
    let iss = idp.base();
    // The document claims another issuer (a provider serving someone
    // else's configuration): its jwks_uri is never fetched.
    idp.discovery("https://idp.test/someone-else");
    let h = builder()
        .policy(&policy())
        .config(&config(&format!(
            "[[auth.issuers]]\nissuer = \"{iss}\"\ndiscovery = true\nidentity_prefix = \"d:\"\n"
        )))
        .start();
    let failed = format!("herald_key_set_refreshes_total{{issuer=\"{iss}\",result=\"failed\"}}");
    common::eventually(WAIT, "discovery is refused", || async {
        (h.metric(&failed).await >= 1.0).then_some(())
    })
    .await;
    assert!(idp.discovery_hits() >= 1);
    assert_eq!(idp.jwks_hits(), 0, "the named key set was never fetched");
    assert_eq!(
        attempt(&h, &key.sign(&claims(Some(&iss), "alice"))).await,
        (503, "provider_unavailable".into())
    );
}
