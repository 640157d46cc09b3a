//! Ingest-to-client latency, per source: the time from Infisical's side
//! sending a change (a signed webhook posted; a message PUBLISHed on its
//! Redis channel) until a native SSE client has the event.
//!
//! - webhook: the embedded bus, one instance;
//! - redis: a real redis-server, nats-server with JetStream, two herald
//!   instances with replay, both ingesting (each message is stored once),
//!   the client on one of them.
//!
//! One change at a time, INGEST_EVENTS (300) per source; printed: p50,
//! p99, max. Run: `cargo bench --bench ingest` (needs nats-server and
//! redis-server, which scripts/install-test-tools installs).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::ingest::{bus_message, now_ms, signature, webhook_body, CHANNEL};
use common::nats::{urls_env, NatsServer};
use common::redis::RedisServer;
use common::{token_for, HeraldBuilder, SseClient, SECRET};
use serde_json::json;

const HOUR: Duration = Duration::from_secs(3600);
const WEBHOOK_SECRET: &str = "bench-webhook-secret-0123456789";

fn all_of_p1() -> serde_json::Value {
    json!({"projectId": "p1", "register": [{"event": "secret:updated"}]})
}

fn report(source: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    println!(
        "| {source} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
        v.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    );
}

async fn until(c: &mut SseClient, path: &str) {
    loop {
        let e = c.next_event().await;
        if e.json()["secretpath"] == path {
            return;
        }
    }
}

async fn webhook(n: usize) -> Vec<Duration> {
    let h = HeraldBuilder::new()
        .config(&format!(
            "[auth]\nhs_secret = \"{SECRET}\"\n[ingest.webhook]\nlisten = \"127.0.0.1:0\"\nsecrets = [\"{WEBHOOK_SECRET}\"]\n"
        ))
        .log("warn")
        .start();
    let mut client = h.subscribe(&token_for("reader", HOUR), &all_of_p1()).await;
    let url = format!(
        "http://{}/api/v1/ingest/infisical/webhook",
        h.webhook.expect("a webhook listener")
    );
    let http = reqwest::Client::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = now_ms();
        let path = format!("/w{i}");
        let body = webhook_body(&path, t);
        let sig = signature(WEBHOOK_SECRET, &body, t);
        let start = Instant::now();
        let r = http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-infisical-signature", sig)
            .body(body)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 202);
        until(&mut client, &path).await;
        out.push(start.elapsed());
    }
    out
}

async fn redis(n: usize) -> Vec<Duration> {
    let nats = NatsServer::start_jetstream();
    let redis = RedisServer::start().await;
    let instance = || {
        HeraldBuilder::new()
            .env("NATS__URLS", &urls_env(&[nats.url()]))
            .env("REPLAY__ENABLED", "true")
            .config(&format!(
                "[auth]\nhs_secret = \"{SECRET}\"\n[ingest.redis]\nurl = \"{}\"\n",
                redis.url()
            ))
            .log("warn")
            .start()
    };
    let (h1, h2) = (instance(), instance());
    h1.wait_ready(200).await;
    h2.wait_ready(200).await;
    common::eventually(common::WAIT, "both instances subscribed", || async {
        (redis.subscribers(CHANNEL).await == 2).then_some(())
    })
    .await;
    let mut client = h2.subscribe(&token_for("reader", HOUR), &all_of_p1()).await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let path = format!("/r{i}");
        let m = bus_message("secret:update", &path, &["K"], "container-bench");
        let start = Instant::now();
        redis.publish(CHANNEL, &m).await;
        until(&mut client, &path).await;
        out.push(start.elapsed());
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = std::env::var("INGEST_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    println!("| source | events | p50 | p99 | max |");
    println!("| --- | --- | --- | --- | --- |");
    report("webhook (embedded)", webhook(n).await);
    report("redis (2 instances, NATS + replay)", redis(n).await);
}
