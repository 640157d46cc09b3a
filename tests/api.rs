//! The public API against the real binary: round trip, filtering, permissions,
//! token refusals and malformed input.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);

transport_tests! {
async fn subscribe_publish_round_trip(t: Transport) {
    let h = HeraldBuilder::new().transport(t).start();
    let mut s = h
        .subscribe(
            &token_for("reader", HOUR),
            &registration("p1", "secret:created", None, None),
        )
        .await;
    let first = s.next_raw(WAIT).await.expect("retry hint");
    assert_eq!(
        first.retry,
        Some(3000),
        "a stream starts with a retry: hint"
    );
    let answer = h
        .publish(
            &token_for("writer", HOUR),
            &event("secret:created", "p1", "prod", "/apps/db"),
        )
        .await;
    let id = answer["ids"][0].as_str().expect("id assigned").to_owned();
    let seq = answer["events"][0]["sequence"]
        .as_u64()
        .expect("sequence assigned");
    let ev = s.next_event().await;
    assert_eq!(ev.event.as_deref(), Some("secret:created"));
    assert_eq!(ev.id, Some(seq.to_string()));
    let body = ev.json();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["specversion"], "1.0");
    assert_eq!(body["projectid"], "p1");
    assert_eq!(body["environment"], "prod");
    assert_eq!(body["secretpath"], "/apps/db");
    assert_eq!(body["data"]["secretKeys"][0], "KEY");
    assert!(body["time"].is_string());
}
}

/// Publishes `events` then a sentinel every subscriber wants; returns the
/// secret paths each stream saw before its sentinel.
async fn received_before_sentinel(
    h: &Herald,
    streams: &mut [SseClient],
    events: &[Value],
) -> Vec<Vec<String>> {
    let w = token_for("writer", HOUR);
    for e in events {
        h.publish(&w, e).await;
    }
    h.publish(&w, &event("secret:deleted", "p1", "prod", "/sentinel"))
        .await;
    let mut out = Vec::new();
    for s in streams.iter_mut() {
        let seen = s.events_until("/sentinel").await.into_iter().map(|ev| {
            let v = ev.json();
            let (env, p) = (
                v["environment"].as_str().unwrap_or(""),
                v["secretpath"].as_str().unwrap_or(""),
            );
            format!("{} {env} {p}", ev.event.as_deref().unwrap_or_default())
        });
        out.push(seen.collect());
    }
    out
}

transport_tests! {
async fn filters_by_type_environment_and_path(t: Transport) {
    let h = HeraldBuilder::new().transport(t)
        .env("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "10")
        .start();
    let t = token_for("reader", HOUR);
    let with_sentinel = |mut body: Value| {
        body["register"]
            .as_array_mut()
            .unwrap()
            .push(json!({"event": "secret:deleted", "conditions": {"secretPath": "/sentinel"}}));
        body
    };
    let cases = [
        registration("p1", "secret:updated", None, None),
        registration("p1", "secret:created", Some("prod"), None),
        registration("p1", "secret:create", None, Some("/apps")),
        registration("p1", "secret:created", None, Some("/apps/*")),
        registration("p1", "secret:created", None, Some("/apps/**/creds")),
        registration("p1", "secret:created", None, Some("/apps/db-*")),
    ];
    let mut streams = Vec::new();
    for c in cases {
        streams.push(h.subscribe(&t, &with_sentinel(c)).await);
    }
    let events = [
        event("secret:created", "p1", "prod", "/apps"),
        event("secret:created", "p1", "dev", "/apps/db"),
        event("secret:created", "p1", "prod", "/apps2"),
        event("secret:updated", "p1", "prod", "/apps/db/creds"),
        event("secret:created", "p1", "dev", "/apps/x/y/creds"),
        event("secret:created", "p1", "prod", "/apps/db-main"),
        event("secret:created", "p2", "prod", "/apps"),
    ];
    let got = received_before_sentinel(&h, &mut streams, &events).await;
    assert_eq!(
        got[0],
        vec!["secret:updated prod /apps/db/creds"],
        "type filter"
    );
    assert_eq!(
        got[1],
        vec![
            "secret:created prod /apps",
            "secret:created prod /apps2",
            "secret:created prod /apps/db-main"
        ],
        "environment filter"
    );
    assert_eq!(
        got[2],
        vec![
            "secret:created prod /apps",
            "secret:created dev /apps/db",
            "secret:created dev /apps/x/y/creds",
            "secret:created prod /apps/db-main"
        ],
        "plain path is the folder and below, never /apps2"
    );
    assert_eq!(
        got[3],
        vec![
            "secret:created dev /apps/db",
            "secret:created prod /apps/db-main"
        ],
        "* is one segment"
    );
    assert_eq!(
        got[4],
        vec!["secret:created dev /apps/x/y/creds"],
        "** is any depth"
    );
    assert_eq!(
        got[5],
        vec!["secret:created prod /apps/db-main"],
        "glob inside a segment"
    );
}
}

transport_tests! {
async fn overlapping_registrations_deliver_once(t: Transport) {
    let h = HeraldBuilder::new().transport(t).start();
    let body = json!({"projectId": "p1", "register": [
        {"event": "secret:created"},
        {"event": "secret:created", "conditions": {"secretPath": "/apps"}},
        {"event": "secret:created", "conditions": {"environmentSlug": "prod", "secretPath": "/apps/db"}},
        {"event": "secret:deleted", "conditions": {"secretPath": "/sentinel"}},
    ]});
    let mut s = h.subscribe(&token_for("reader", HOUR), &body).await;
    let got = received_before_sentinel(
        &h,
        std::slice::from_mut(&mut s),
        &[event("secret:created", "p1", "prod", "/apps/db")],
    )
    .await;
    assert_eq!(got[0], vec!["secret:created prod /apps/db"]);
}
}

#[tokio::test]
async fn subscribe_is_refused_with_403_naming_the_registration() {
    let h = Herald::start();
    let body = json!({"projectId": "p1", "register": [
        {"event": "secret:created", "conditions": {"environmentSlug": "prod", "secretPath": "/apps/db"}},
        {"event": "secret:created", "conditions": {"environmentSlug": "dev"}},
    ]});
    let r = h
        .subscribe_raw(Some(&token_for("prod-db", HOUR)), &body)
        .await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "forbidden");
    assert_eq!(v["error"]["details"]["registration"], 1);
    assert_eq!(v["error"]["details"]["environmentSlug"], "dev");
    // Nothing at all for an unknown identity; and a deny rule that covers the registration.
    let r = h
        .subscribe_raw(
            Some(&token_for("stranger", HOUR)),
            &registration("p1", "secret:created", None, None),
        )
        .await;
    assert_eq!(r.status(), 403);
    let r = h
        .subscribe_raw(
            Some(&token_for("reader", HOUR)),
            &registration("p1", "secret:created", None, Some("/internal/keys")),
        )
        .await;
    assert_eq!(r.status(), 403);
    // prod-db is scoped to project p1.
    let r = h
        .subscribe_raw(
            Some(&token_for("prod-db", HOUR)),
            &registration("p2", "secret:created", Some("prod"), Some("/apps/db")),
        )
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        h.metric("herald_permission_denied_total{stage=\"subscribe\"}")
            .await,
        4.0
    );
}

transport_tests! {
async fn delivery_time_check_hides_denied_events(t: Transport) {
    let h = HeraldBuilder::new().transport(t).start();
    // reader may subscribe to everything, but a deny rule covers /internal/**;
    // prod-db asked for all of p1 prod but may only see /apps/db/**.
    let mut reader = h
        .subscribe(&token_for("reader", HOUR), &json!({"projectId": "p1", "register": [
            {"event": "secret:created"}, {"event": "secret:deleted", "conditions": {"secretPath": "/sentinel"}}]}))
        .await;
    let mut narrow = h
        .subscribe(&token_for("prod-db", HOUR), &json!({"projectId": "p1", "register": [
            {"event": "secret:created", "conditions": {"environmentSlug": "prod"}},
            {"event": "secret:deleted", "conditions": {"environmentSlug": "prod", "secretPath": "/apps/db/sentinel"}}]}))
        .await;
    let w = token_for("writer", HOUR);
    for e in [
        event("secret:created", "p1", "prod", "/internal/keys"),
        event("secret:created", "p1", "prod", "/internal"),
        event("secret:created", "p1", "prod", "/apps/web"),
        event("secret:created", "p1", "prod", "/apps/db/x"),
    ] {
        h.publish(&w, &e).await;
    }
    h.publish(&w, &event("secret:deleted", "p1", "prod", "/sentinel"))
        .await;
    h.publish(
        &w,
        &event("secret:deleted", "p1", "prod", "/apps/db/sentinel"),
    )
    .await;
    assert_eq!(
        reader.paths_until("/sentinel").await,
        vec!["/apps/web", "/apps/db/x"]
    );
    let seen = narrow.paths_until("/apps/db/sentinel").await;
    assert_eq!(seen, vec!["/apps/db/x"]);
    assert!(
        h.metric("herald_permission_denied_total{stage=\"delivery\"}")
            .await
            >= 4.0
    );
}
}

#[tokio::test]
async fn bad_tokens_get_401() {
    use base64::Engine;
    let h = Herald::start();
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let body = registration("p1", "secret:created", None, None);
    let exp = herald::auth::unix_now() + 3600;
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(r#"{{"sub":"reader","exp":{exp}}}"#))
    );
    let expired = herald::auth::Signer::hmac(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes())
        .unwrap()
        .sign(&json!({"sub": "reader", "exp": herald::auth::unix_now() - 600}))
        .unwrap();
    let wrong_sig = herald::auth::Signer::hmac(
        jsonwebtoken::Algorithm::HS256,
        b"some-other-secret-some-other-secret",
    )
    .expect("a valid key")
    .mint("reader", HOUR, None, None)
    .unwrap();
    let rs = {
        let pem = std::fs::read(repo_path("tests/fixtures/rsa_private.pem")).unwrap();
        herald::auth::Signer::from_pem(jsonwebtoken::Algorithm::RS256, &pem)
            .unwrap()
            .mint("reader", HOUR, None, None)
            .unwrap()
    };
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing"),
        (Some("garbage".into()), "malformed"),
        (Some(expired), "expired"),
        (Some(wrong_sig), "signature"),
        (Some(alg_none), "malformed"),
        (Some(rs), "algorithm"),
    ];
    for (tok, reason) in cases {
        let r = h.subscribe_raw(tok.as_deref(), &body).await;
        assert_eq!(r.status(), 401, "{reason}");
        assert_eq!(r.headers().get("www-authenticate").unwrap(), "Bearer");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
        assert_eq!(v["error"]["details"]["reason"], reason);
        let p = h
            .publish_raw(
                tok.as_deref().unwrap_or(""),
                &event("secret:created", "p1", "prod", "/a"),
            )
            .await;
        assert_eq!(p.status(), 401, "publish with {reason}");
    }
    assert!(
        h.metric("herald_auth_failures_total{reason=\"signature\"}")
            .await
            >= 2.0
    );
}

/// Signs arbitrary claims with the test secret (tokens `mint` refuses to make).
fn signed(claims: Value) -> String {
    herald::auth::Signer::hmac(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes())
        .unwrap()
        .sign(&claims)
        .unwrap()
}

/// The 401 reason for a subscribe with `token`.
async fn refusal(h: &Herald, token: &str) -> (u16, Value) {
    let r = h
        .subscribe_raw(
            Some(token),
            &registration("p1", "secret:created", None, None),
        )
        .await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_token_naming_a_role_holds_no_role() {
    // The shipped policy grants role:admin everything and role:reader reads;
    // a token whose sub is the role name gets neither, anywhere.
    let h = Herald::start();
    let exp = herald::auth::unix_now() + 3600;
    for sub in ["role:admin", "role:reader", "Role:admin", "roles:x", "role"] {
        let (status, v) = refusal(&h, &signed(json!({"sub": sub, "exp": exp}))).await;
        assert_eq!(status, 401, "{sub}");
        assert_eq!(v["error"]["details"]["reason"], "identity", "{sub}");
        let p = h
            .publish_raw(
                &signed(json!({"sub": sub, "exp": exp})),
                &event("secret:created", "p9", "prod", "/a"),
            )
            .await;
        assert_eq!(p.status(), 401, "publish as {sub}");
    }
    // The CLI refuses to mint one.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["token", "mint", "--sub", "role:admin"])
        .env("HERALD_AUTH__HS_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("role"));
}

#[tokio::test]
async fn configured_claims_are_required_with_their_rfc_7519_types() {
    let h = HeraldBuilder::new()
        .config(&format!(
            "[auth]\nhs_secret = \"{SECRET}\"\nissuer = \"https://idp.example\"\naudience = \"herald\"\n"
        ))
        .start();
    let now = herald::auth::unix_now();
    let good =
        json!({"sub": "reader", "exp": now + 3600, "iss": "https://idp.example", "aud": "herald"});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v;
        }
        signed(c)
    };
    let cases = [
        (with("aud", Value::Null), "missing_claim"),
        (with("aud", json!(7)), "claim_type"),
        (with("aud", json!({"herald": true})), "claim_type"),
        (with("aud", json!("other")), "claims"),
        (with("iss", json!(["https://idp.example"])), "claim_type"),
        (
            with("iss", json!(["x", "https://idp.example"])),
            "claim_type",
        ),
        (with("iss", Value::Null), "missing_claim"),
        (with("nbf", json!("99999999999")), "claim_type"),
        (with("nbf", json!(now + 3600)), "not_yet_valid"),
        (with("exp", json!("99999999999")), "claim_type"),
        (with("exp", json!(1e10)), "claim_type"),
        (with("iat", json!(now + 3600)), "not_yet_valid"),
    ];
    for (token, reason) in cases {
        let (status, v) = refusal(&h, &token).await;
        assert_eq!(status, 401, "{reason}: {v}");
        assert_eq!(v["error"]["details"]["reason"], reason, "{v}");
    }
    let mut s = h
        .subscribe(
            &with("aud", json!(["x", "herald"])),
            &registration("p1", "secret:created", None, None),
        )
        .await;
    assert_eq!(s.next_raw(WAIT).await.unwrap().retry, Some(3000));
}

#[tokio::test]
async fn a_token_that_never_expires_opens_a_stream_and_breaks_nothing() {
    let h = Herald::start();
    let forever = signed(json!({"sub": "reader", "exp": u64::MAX}));
    let mut s = h
        .subscribe(&forever, &registration("p1", "secret:created", None, None))
        .await;
    h.publish(
        &token_for("writer", HOUR),
        &event("secret:created", "p1", "prod", "/a"),
    )
    .await;
    assert_eq!(s.next_event().await.json()["secretpath"], "/a");
    let (status, _) = h.admin_json("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn hs_token_signed_with_the_rsa_public_key_is_refused() {
    // Algorithm confusion: herald trusts only an RSA public key; an attacker signs
    // HS256 with that public key's bytes as the HMAC secret.
    let public = repo_path("tests/fixtures/rsa_public.pem");
    let h = HeraldBuilder::new()
        .config(&format!(
            "[auth]\npublic_key_file = {:?}\n",
            public.display().to_string()
        ))
        .start();
    let pem = std::fs::read(&public).unwrap();
    let forged = herald::auth::Signer::hmac(jsonwebtoken::Algorithm::HS256, &pem)
        .expect("a valid key")
        .mint("reader", HOUR, None, None)
        .unwrap();
    let r = h
        .subscribe_raw(
            Some(&forged),
            &registration("p1", "secret:created", None, None),
        )
        .await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["details"]["reason"], "algorithm");
    // The genuine RS256 token works.
    let private = std::fs::read(repo_path("tests/fixtures/rsa_private.pem")).unwrap();
    let good = herald::auth::Signer::from_pem(jsonwebtoken::Algorithm::RS256, &private)
        .unwrap()
        .mint("reader", HOUR, None, None)
        .unwrap();
    let mut s = h
        .subscribe(&good, &registration("p1", "secret:created", None, None))
        .await;
    assert_eq!(s.next_raw(WAIT).await.unwrap().retry, Some(3000));
}

#[tokio::test]
async fn malformed_subscribe_requests_get_400_naming_the_field() {
    let h = Herald::start();
    let t = token_for("reader", HOUR);
    let eleven: Vec<Value> = (0..11)
        .map(|i| json!({"event": "secret:created", "conditions": {"secretPath": format!("/a{i}")}}))
        .collect();
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"projectId": "p1", "register": [{"event": "secret:exploded"}]}),
            "unknown_event",
            "register[0].event",
        ),
        (
            json!({"projectId": "p.1", "register": [{"event": "secret:created"}]}),
            "invalid_project_id",
            "projectId",
        ),
        (
            json!({"projectId": "p1", "register": [{"event": "secret:created", "conditions": {"secretPath": "/apps/../etc"}}]}),
            "invalid_secret_path",
            "register[0].conditions.secretPath",
        ),
        (
            json!({"projectId": "p1", "register": [{"event": "secret:created", "conditions": {"secretPath": "/apps/\u{7}x"}}]}),
            "invalid_secret_path",
            "register[0].conditions.secretPath",
        ),
        (
            json!({"projectId": "p1", "register": [{"event": "secret:created", "conditions": {"secretPath": "/apps\n"}}]}),
            "invalid_secret_path",
            "register[0].conditions.secretPath",
        ),
        (
            json!({"projectId": "p1", "register": [{"event": "secret:created", "conditions": {"environmentSlug": "pr od"}}]}),
            "invalid_environment",
            "register[0].conditions.environmentSlug",
        ),
        (
            json!({"projectId": "p1", "register": eleven}),
            "invalid_registrations",
            "register",
        ),
        (
            json!({"projectId": "p1", "register": []}),
            "invalid_registrations",
            "register",
        ),
        (json!({"projectId": "p1"}), "invalid_request", "body"),
        (
            json!({"projectId": "p1", "register": [{"event": "secret:created"}], "extra": 1}),
            "invalid_request",
            "body",
        ),
    ];
    for (body, code, field) in cases {
        let r = h.subscribe_raw(Some(&t), &body).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{body}");
        assert_eq!(v["error"]["details"]["field"], field, "{body}");
    }
    let r = h
        .http
        .post(h.url(SUBSCRIBE))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body("{\"projectId\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "malformed_json");
}

#[tokio::test]
async fn registrations_hold_a_bounded_amount_of_patterns() {
    let h = HeraldBuilder::new()
        .env("LIMITS__MAX_REGISTRATION_BYTES", "2048")
        .start();
    let long = |c: char| format!("/{}", c.to_string().repeat(900));
    let reg = |p: String| json!({"event": "secret:created", "conditions": {"secretPath": p}});
    // The same pattern for every type counts once.
    let same: Vec<Value> = (0..4).map(|_| reg(long('a'))).collect();
    let r = h
        .subscribe_raw(
            Some(&token_for("reader", HOUR)),
            &json!({"projectId": "p1", "register": same}),
        )
        .await;
    assert_eq!(r.status(), 200);
    drop(r);
    let distinct = vec![reg(long('a')), reg(long('b')), reg(long('c'))];
    let r = h
        .subscribe_raw(
            Some(&token_for("reader", HOUR)),
            &json!({"projectId": "p1", "register": distinct}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_registrations");
    assert_eq!(v["error"]["details"]["limit"], 2048);
}

#[tokio::test]
async fn malformed_publishes_are_refused_and_nothing_is_published() {
    let h = Herald::start();
    let mut s = h
        .subscribe(
            &token_for("reader", HOUR),
            &registration("p1", "secret:created", None, None),
        )
        .await;
    let w = token_for("writer", HOUR);
    let mut bad_path = event("secret:created", "p1", "prod", "/a/../b");
    let r = h.publish_raw(&w, &bad_path).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["details"]["field"], "secretpath");
    bad_path["secretpath"] = json!("/ok");
    bad_path["type"] = json!("secret:nope");
    // A batch with one bad event publishes none of them.
    let batch = json!([event("secret:created", "p1", "prod", "/first"), bad_path]);
    let r = h.publish_raw(&w, &batch).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["details"]["field"], "[1].type");
    // Publishing needs the publish permission: reader has none.
    let r = h
        .publish_raw(
            &token_for("reader", HOUR),
            &event("secret:created", "p1", "prod", "/x"),
        )
        .await;
    assert_eq!(r.status(), 403);
    // A good batch is accepted whole, in order.
    let ok = h
        .publish(
            &w,
            &json!([
                event("secret:created", "p1", "prod", "/one"),
                event("secret:created", "p1", "prod", "/two")
            ]),
        )
        .await;
    assert_eq!(ok["ids"].as_array().unwrap().len(), 2);
    assert_eq!(
        s.next_event().await.json()["secretpath"],
        "/one",
        "nothing from the refused requests came first"
    );
    assert_eq!(s.next_event().await.json()["secretpath"], "/two");
    assert!(
        h.metric("herald_events_rejected_total{reason=\"unknown_type\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn size_and_content_type_limits() {
    let h = HeraldBuilder::new()
        .env("LIMITS__MAX_EVENT_BYTES", "4096")
        .start();
    let w = token_for("writer", HOUR);
    let big = "x".repeat(70 * 1024);
    let r = h
        .http
        .post(h.url(PUBLISH))
        .bearer_auth(&w)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "body_too_large");
    // Within the body limit but over the event limit.
    let mut e = event("secret:created", "p1", "prod", "/a");
    e["data"] = json!({"blob": "y".repeat(8000)});
    let r = h.publish_raw(&w, &e).await;
    assert_eq!(r.status(), 413);
    let r = h
        .http
        .post(h.url(PUBLISH))
        .bearer_auth(&w)
        .header("content-type", "text/plain")
        .body(event("secret:created", "p1", "prod", "/a").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = h
        .http
        .post(h.url(SUBSCRIBE))
        .bearer_auth(token_for("reader", HOUR))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = h.http.get(h.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = h.http.delete(h.url(PUBLISH)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers().get("allow").unwrap(), "POST, OPTIONS");
}

#[tokio::test]
async fn browser_get_with_query_token_or_cookie() {
    let h = HeraldBuilder::new()
        .env("CORS__ALLOWED_ORIGINS", "[\"https://app.example.com\"]")
        .start();
    let t = token_for("reader", HOUR);
    let url = format!(
        "{}?projectId=p1&event=secret:created&secretPath=/apps&access_token={t}",
        h.url(SUBSCRIBE)
    );
    let r = h
        .http
        .get(&url)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers().get("access-control-allow-origin").unwrap(),
        "https://app.example.com"
    );
    assert_eq!(
        r.headers().get("access-control-allow-credentials").unwrap(),
        "true"
    );
    let mut by_query = SseClient::open(r).await;
    let reg =
        json!({"event": "secret:updated", "conditions": {"environmentSlug": "prod"}}).to_string();
    let url = format!(
        "{}?projectId=p1&register={}",
        h.url(SUBSCRIBE),
        url::form_urlencoded::byte_serialize(reg.as_bytes()).collect::<String>()
    );
    let r = h
        .http
        .get(&url)
        .header("cookie", format!("theme=dark; herald_token={t}"))
        .send()
        .await
        .unwrap();
    let mut by_cookie = SseClient::open(r).await;
    let w = token_for("writer", HOUR);
    h.publish(&w, &event("secret:created", "p1", "prod", "/apps/x"))
        .await;
    h.publish(&w, &event("secret:updated", "p1", "prod", "/y"))
        .await;
    assert_eq!(by_query.next_event().await.json()["secretpath"], "/apps/x");
    assert_eq!(by_cookie.next_event().await.json()["secretpath"], "/y");
    // The token is not accepted from the query on POST.
    let r = h
        .http
        .post(format!("{}?access_token={t}", h.url(SUBSCRIBE)))
        .json(&registration("p1", "secret:created", None, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Preflight from an allowed and a foreign origin.
    let r = h
        .http
        .request(reqwest::Method::OPTIONS, h.url(SUBSCRIBE))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r
        .headers()
        .get("access-control-allow-headers")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("last-event-id"));
    let r = h
        .http
        .request(reqwest::Method::OPTIONS, h.url(SUBSCRIBE))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn admin_endpoints_and_metrics_exposition() {
    let h = Herald::start();
    let (s, v) = h.admin_json("/healthz").await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = h.admin_json("/readyz").await;
    assert_eq!((s, v["ready"].as_bool()), (200, Some(true)));
    let (_, v) = h.admin_json("/admin/policy").await;
    assert_eq!(v["generation"], 1);
    assert_eq!(v["fingerprint"].as_str().map(str::len), Some(16));
    let _s = h
        .subscribe(
            &token_for("reader", HOUR),
            &registration("p1", "secret:created", Some("prod"), Some("/apps")),
        )
        .await;
    let (_, v) = h.admin_json("/admin/connections").await;
    assert_eq!(v["count"], 1);
    assert_eq!(v["connections"][0]["identity"], "reader");
    assert_eq!(
        v["connections"][0]["registrations"][0]["secretPath"],
        "/apps/**"
    );
    h.wait_metric("herald_connections", 1.0).await;

    let text = h.metrics().await;
    for name in [
        "herald_connections",
        "herald_subscriptions_total",
        "herald_events_received_total",
        "herald_events_delivered_total",
        "herald_events_rejected_total",
        "herald_events_dropped_total",
        "herald_delivery_latency_seconds",
        "herald_nats_subscriptions",
        "herald_nats_connected",
        "herald_auth_failures_total",
        "herald_permission_denied_total",
        "herald_policy_generation",
        "herald_policy_reloads_total",
        "herald_replayed_events_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name}")),
            "{name} missing from /metrics"
        );
    }
    if let Some(promtool) = tool("promtool", "apt-get install prometheus") {
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && msg.trim().is_empty(),
            "promtool check metrics: {msg}"
        );
    }
}

#[tokio::test]
async fn streams_work_over_h2c() {
    let h = Herald::start();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .post(h.url(SUBSCRIBE))
        .bearer_auth(token_for("reader", HOUR))
        .json(&registration("p1", "secret:created", None, None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let mut s = SseClient::open(resp).await;
    // A second stream and a publish share the same HTTP/2 connection.
    let resp = h2
        .post(h.url(SUBSCRIBE))
        .bearer_auth(token_for("reader", HOUR))
        .json(&registration("p1", "secret:created", None, Some("/apps")))
        .send()
        .await
        .unwrap();
    let mut s2 = SseClient::open(resp).await;
    let r = h2
        .post(h.url(PUBLISH))
        .bearer_auth(token_for("writer", HOUR))
        .json(&event("secret:created", "p1", "prod", "/apps/db"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(s.next_event().await.json()["secretpath"], "/apps/db");
    assert_eq!(s2.next_event().await.json()["secretpath"], "/apps/db");
}

/// Claim mapping, as for a machine-identity token without `exp`: the
/// identity is `identityId` with a prefix, and the token lives up to
/// `auth.max_token_age` from its `iat`.
#[tokio::test]
async fn identities_come_from_the_configured_claim_and_tokens_without_exp_age_out() {
    let policy = format!(
        "{}\np, infisical:m1, p1, secret:*, subscribe, *, /**, allow\np, infisical:w1, p1, secret:*, publish, *, /**, allow\n",
        std::fs::read_to_string(repo_path("policies/policy.csv")).unwrap()
    );
    let h = HeraldBuilder::new()
        .policy(&policy)
        .config(&format!(
            "[auth]\nhs_secret = \"{SECRET}\"\nidentity_claim = \"identityId\"\nidentity_prefix = \"infisical:\"\nrequire_exp = false\nmax_token_age = \"1h\"\n"
        ))
        .start();
    let now = herald::auth::unix_now();
    let body = registration("p1", "secret:created", None, None);
    let cases = [
        // Past its maximum age.
        (
            json!({"identityId": "m1", "iat": now - 3700}),
            401,
            "expired",
        ),
        // No iat to measure the age from.
        (json!({"identityId": "m1"}), 401, "missing_claim"),
        // `sub` is not the identity here.
        (json!({"sub": "m1", "iat": now}), 401, "missing_claim"),
        // Another identity: no grant.
        (json!({"identityId": "m2", "iat": now}), 403, ""),
    ];
    for (claims, status, reason) in cases {
        let (got, v) = refusal(&h, &signed(claims.clone())).await;
        assert_eq!(got, status, "{claims}: {v}");
        if !reason.is_empty() {
            assert_eq!(v["error"]["details"]["reason"], reason, "{claims}: {v}");
        }
    }
    let mut s = h
        .subscribe(&signed(json!({"identityId": "m1", "iat": now})), &body)
        .await;
    h.publish(
        &signed(json!({"identityId": "w1", "iat": now})),
        &event("secret:created", "p1", "prod", "/a"),
    )
    .await;
    assert_eq!(s.next_event().await.json()["secretpath"], "/a");
    // A token naming its identity in `sub` names none here.
    let r = h
        .publish_raw(
            &token_for("writer", HOUR),
            &event("secret:created", "p1", "prod", "/b"),
        )
        .await;
    assert_eq!(r.status(), 401);
}
