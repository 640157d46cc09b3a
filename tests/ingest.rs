//! Ingest from a stock Infisical, with the real parts: webhooks posted
//! exactly as Infisical signs them (`x-infisical-signature: t=<ms>;<hex
//! HMAC-SHA256 of the body>`), and a real `redis-server` carrying messages
//! in the shapes Infisical's servers publish on `infisical::core-servers`,
//! read by two herald instances on NATS with replay. Clients: a native SSE
//! client and Infisical's operator (its parser, ported).

mod common;

use std::time::Duration;

use common::infisical::{cli_decode, open_at, operator_body, Operator};
use common::ingest::{bus_message, now_ms, signature, webhook_body, CHANNEL};
use common::nats::{urls_env, NatsServer};
use common::redis::RedisServer;
use common::{registration, token_for, Herald, HeraldBuilder, SseClient, SUBSCRIBE, WAIT};
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);
const OLD_SECRET: &str = "webhook-secret-old-0123456789";
const NEW_SECRET: &str = "webhook-secret-new-0123456789";
const P2_SECRET: &str = "webhook-secret-of-p2-0123456789";

async fn post(h: &Herald, body: &str, signature: Option<&str>) -> (u16, Value) {
    let url = format!(
        "http://{}/api/v1/ingest/infisical/webhook",
        h.webhook.expect("a webhook listener")
    );
    let mut r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(s) = signature {
        r = r.header("x-infisical-signature", s);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn operator_url(h: &Herald) -> String {
    format!("http://{}{SUBSCRIBE}", h.infisical.unwrap())
}

/// The next event a native client gets, as (type, path).
async fn native_next(c: &mut SseClient) -> (String, String) {
    let e = c.next_event().await;
    let v = e.json();
    (
        e.event.clone().unwrap_or_default(),
        v["secretpath"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn a_signed_webhook_reaches_every_client_once_and_nothing_else_gets_in() {
    let h = HeraldBuilder::new()
        .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0")
        .config(&format!(
            "[auth]\nhs_secret = \"{}\"\n[ingest.webhook]\nlisten = \"127.0.0.1:0\"\nsecrets = [\"{OLD_SECRET}\", \"{NEW_SECRET}\"]\nmax_skew = \"1m\"\n[ingest.webhook.project_secrets]\np2 = [\"{P2_SECRET}\"]\n",
            common::SECRET
        ))
        .start();
    let token = token_for("reader", HOUR);
    let mut native = h
        .subscribe(&token, &registration("p1", "secret:updated", None, None))
        .await;
    let mut op = Operator::new(open_at(&operator_url(&h), &token, &operator_body("/apps")).await);

    let t = now_ms();
    let body = webhook_body("/apps", t);
    let (status, v) = post(&h, &body, Some(&signature(NEW_SECRET, &body, t))).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (202, Some("published")),
        "{v}"
    );
    assert_eq!(
        native_next(&mut native).await,
        ("secret:updated".into(), "/apps".into())
    );
    let d = op.next().await.expect("the operator's event");
    assert_eq!(d.event, "secret:update");
    let (ty, payload) = cli_decode(&d).unwrap();
    assert_eq!(ty, "secret:update");
    assert_eq!(
        payload,
        json!([{"environment": "prod", "secretPath": "/apps"}])
    );

    // The same delivery again: answered, published once.
    let (status, v) = post(&h, &body, Some(&signature(NEW_SECRET, &body, t))).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (202, Some("duplicate")),
        "{v}"
    );
    // Refused, each with its reason, and nothing reaches a client.
    let stale = now_ms() - 120_000;
    let stale_body = webhook_body("/apps", stale);
    let t2 = now_ms();
    let other = webhook_body("/apps", t2);
    let forged = signature("not-the-secret-0123456789", &other, t2);
    let mut bad_hex = signature(NEW_SECRET, &other, t2);
    bad_hex.truncate(bad_hex.len() - 2);
    for (b, s, status, reason) in [
        (other.clone(), None, 401, "unsigned"),
        (other.clone(), Some(forged), 401, "bad_signature"),
        (other.clone(), Some(bad_hex), 401, "malformed_signature"),
        (
            stale_body.clone(),
            Some(signature(NEW_SECRET, &stale_body, stale)),
            401,
            "stale",
        ),
        // Signed, but its timestamp is not the signed one.
        (
            other.clone(),
            Some(signature(NEW_SECRET, &other, t2 + 1)),
            401,
            "stale",
        ),
        (
            "not json".into(),
            Some(signature(NEW_SECRET, "not json", t2)),
            400,
            "malformed",
        ),
        // Project p2's key cannot speak for p1.
        (
            other.clone(),
            Some(signature(P2_SECRET, &other, t2)),
            403,
            "wrong_project",
        ),
        (
            "x".repeat(70_000),
            Some(signature(NEW_SECRET, "x", t2)),
            413,
            "body",
        ),
    ] {
        let (got, v) = post(&h, &b, s.as_deref()).await;
        assert_eq!((got, v["reason"].as_str()), (status, Some(reason)), "{v}");
        let series =
            format!("herald_ingest_dropped_total{{reason=\"{reason}\",source=\"webhook\"}}");
        assert!(h.metric(&series).await >= 1.0, "{series}");
    }
    // The old secret still signs (rotation), and the next event is this one.
    let t3 = now_ms();
    let next = webhook_body("/apps/db", t3);
    let (status, _) = post(&h, &next, Some(&signature(OLD_SECRET, &next, t3))).await;
    assert_eq!(status, 202);
    assert_eq!(
        native_next(&mut native).await,
        ("secret:updated".into(), "/apps/db".into())
    );
    assert_eq!(
        h.metric("herald_ingest_published_total{source=\"webhook\"}")
            .await,
        2.0
    );
    assert_eq!(
        h.metric("herald_ingest_duplicates_total{source=\"webhook\"}")
            .await,
        1.0
    );
    let (_, view) = h.admin_json("/admin/ingest").await;
    let web = &view["sources"][0];
    assert_eq!(
        (web["source"].as_str(), web["connected"].as_bool()),
        (Some("webhook"), Some(true))
    );
    assert!(web["last_event_at"].is_string(), "{view}");
}

#[tokio::test]
async fn infisicals_redis_bus_reaches_each_client_once_through_two_ingesting_instances() {
    let nats = NatsServer::start_jetstream();
    let mut redis = RedisServer::start().await;
    let instance = || {
        HeraldBuilder::new()
            .env("NATS__URLS", &urls_env(&[nats.url()]))
            .env("REPLAY__ENABLED", "true")
            .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0")
            .config(&format!(
                "[auth]\nhs_secret = \"{}\"\n[ingest.redis]\nurl = \"{}\"\nping_every = \"100ms\"\n",
                common::SECRET,
                redis.url()
            ))
            .start()
    };
    let (mut h1, h2) = (instance(), instance());
    h1.wait_ready(200).await;
    h2.wait_ready(200).await;
    common::eventually(WAIT, "both instances subscribed to the channel", || async {
        (redis.subscribers(CHANNEL).await == 2).then_some(())
    })
    .await;
    let token = token_for("reader", HOUR);
    let all = json!({"projectId": "p1", "register": [
        {"event": "secret:created"}, {"event": "secret:updated"},
        {"event": "secret:deleted"}, {"event": "secret:import-mutation"}]});
    let mut native = h2.subscribe(&token, &all).await;
    let mut op = Operator::new(open_at(&operator_url(&h2), &token, &operator_body("/apps")).await);
    // Subscriptions checked with PING every 100 ms stay up: no gap comes
    // before the first event below.

    // Both instances hear it; JetStream stores it once.
    let m = bus_message(
        "secret:update",
        "/apps",
        &["DB_PASSWORD", "DB_USER"],
        "container-a",
    );
    assert_eq!(redis.publish(CHANNEL, &m).await, 2);
    assert_eq!(
        native_next(&mut native).await,
        ("secret:updated".into(), "/apps".into())
    );
    let d = op.next().await.expect("the operator's event");
    assert_eq!(
        cli_decode(&d).unwrap(),
        (
            "secret:update".into(),
            json!([
            {"environment": "prod", "secretPath": "/apps", "secretKey": "DB_PASSWORD"},
            {"environment": "prod", "secretPath": "/apps", "secretKey": "DB_USER"}])
        )
    );
    // Anything else is counted and dropped; the next good one goes through.
    for junk in [
        &b"not json"[..],
        b"{}",
        br#"{"type":"x","timestamp":"t","sourceContainer":"c","payload":{"type":"user:login"}}"#,
    ] {
        redis.publish(CHANNEL, junk).await;
    }
    let imp = bus_message("secret:import-mutation", "/apps", &[], "container-a");
    redis.publish(CHANNEL, &imp).await;
    assert_eq!(
        native_next(&mut native).await,
        ("secret:import-mutation".into(), "/apps".into())
    );
    let d = op.next().await.expect("import-mutation");
    assert_eq!(d.event, "secret:import-mutation");
    for h in [&h1, &h2] {
        assert_eq!(
            h.metric("herald_ingest_dropped_total{reason=\"malformed\",source=\"redis\"}")
                .await,
            1.0
        );
        assert_eq!(
            h.metric("herald_ingest_dropped_total{reason=\"unrelated\",source=\"redis\"}")
                .await,
            1.0
        );
    }
    let published = h1
        .metric("herald_ingest_published_total{source=\"redis\"}")
        .await
        + h2.metric("herald_ingest_published_total{source=\"redis\"}")
            .await;
    let duplicates = h1
        .metric("herald_ingest_duplicates_total{source=\"redis\"}")
        .await
        + h2.metric("herald_ingest_duplicates_total{source=\"redis\"}")
            .await;
    assert_eq!(
        (published, duplicates),
        (2.0, 2.0),
        "each stored once, the other instance's a duplicate"
    );

    // The other ingesting instance dies: nothing is lost or doubled.
    h1.signal("KILL");
    let _ = h1.wait_exit(WAIT).await;
    for i in 0..3 {
        let m = bus_message(
            "secret:delete",
            &format!("/apps/{i}"),
            &["K"],
            "container-b",
        );
        redis.publish(CHANNEL, &m).await;
    }
    for i in 0..3 {
        assert_eq!(
            native_next(&mut native).await,
            ("secret:deleted".into(), format!("/apps/{i}"))
        );
    }

    // Redis restarts: what it carried meanwhile is gone, so streams are told.
    redis.restart().await;
    let gap = native.next_event().await;
    assert_eq!(gap.event.as_deref(), Some("gap"), "{gap:?}");
    assert_eq!(gap.json()["reason"], "source_unavailable", "{gap:?}");
    let told = op.next().await.expect("the operator is told");
    assert_eq!(told.event, "gap");
    common::eventually(WAIT, "herald subscribed again", || async {
        (redis.subscribers(CHANNEL).await == 1).then_some(())
    })
    .await;
    let m = bus_message("secret:create", "/apps", &["NEW"], "container-a");
    redis.publish(CHANNEL, &m).await;
    assert_eq!(
        native_next(&mut native).await,
        ("secret:created".into(), "/apps".into())
    );
}

#[test]
fn ingest_on_nats_without_replay_is_refused_with_a_reason() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["config", "print"])
        .env("HERALD_NATS__URLS", "[\"nats://127.0.0.1:4222\"]")
        .env("HERALD_INGEST__REDIS__URL", "redis://127.0.0.1:6379")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("replay.enabled"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["config", "print"])
        .env("HERALD_INGEST__WEBHOOK__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ingest.webhook.secrets"),
        "{err}"
    );
    // A password in the URL is not printed.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["config", "print"])
        .env(
            "HERALD_INGEST__REDIS__URL",
            "redis://:hunter2-password@127.0.0.1:6379",
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("hunter2"), "{text}");
}
