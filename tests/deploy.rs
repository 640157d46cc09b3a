//! The deployment files under docker/ are checked by the real tools: haproxy
//! parses haproxy.cfg, promtool checks prometheus.yml and the alert rules,
//! herald loads docker/herald.toml, the shipped haproxy config adds no
//! delay to a stream, and docker/infisical-proxy.cfg sends Infisical's
//! event path to herald and everything else to Infisical.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn haproxy_config_is_valid() {
    let Some(haproxy) = tool("haproxy", "apt-get install haproxy") else {
        return;
    };
    let (ok, out) = run(Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(repo_path("docker/haproxy.cfg")));
    assert!(ok, "haproxy -c: {out}");
    assert!(out.contains("Configuration file is valid"), "{out}");
}

#[test]
fn infisical_proxy_config_is_valid() {
    let Some(haproxy) = tool("haproxy", "apt-get install haproxy") else {
        return;
    };
    let (ok, out) = run(Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(repo_path("docker/infisical-proxy.cfg")));
    assert!(ok, "haproxy -c: {out}");
}

#[tokio::test]
async fn the_infisical_proxy_sends_event_streams_to_herald_and_the_rest_to_infisical() {
    let Some(haproxy) = tool("haproxy", "apt-get install haproxy") else {
        return;
    };
    let h = HeraldBuilder::new()
        .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0")
        .env("STREAM__HEARTBEAT", "300ms")
        .start();
    let infisical_port = h.infisical.expect("an infisical listener").port();
    // Infisical itself: any server that is not herald (it answers `{}`).
    let infisical = common::idp::Idp::start(serde_json::json!({"keys": []})).await;
    let _ = haproxy;
    let proxy = common::haproxy::Haproxy::start_infisical(
        &[(infisical_port, h.admin.port())],
        infisical.addr.port(),
    )
    .await;
    let port = proxy.port;
    let base = format!("http://127.0.0.1:{port}");
    // Everything but the event path reaches Infisical.
    let other = eventually(WAIT, "the proxy routes to Infisical", || async {
        let r = reqwest::get(format!("{base}/api/v3/secrets/raw"))
            .await
            .ok()?;
        Some((r.status(), r.text().await.ok()?))
    })
    .await;
    assert_eq!(other, (reqwest::StatusCode::NOT_FOUND, "{}".to_owned()));
    // The event path reaches herald's Infisical listener, once its health
    // check passes: a stream in Infisical's dialect, pings and all.
    let token = token_for("reader", Duration::from_secs(3600));
    let body = serde_json::json!({"projectId": "p1", "register": [{"event": "secret:update"}]});
    let resp = eventually(WAIT, "the proxy routes streams to herald", || async {
        let r = reqwest::Client::new()
            .post(format!("{base}{SUBSCRIBE}"))
            .bearer_auth(&token)
            .header("accept", "text/event-stream")
            .json(&body)
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    let published = h
        .publish_raw(
            &token_for("dev-publisher", Duration::from_secs(60)),
            &event("secret:updated", "p1", "prod", "/apps"),
        )
        .await;
    assert_eq!(published.status(), 202);
    let until = Instant::now() + WAIT;
    while !(seen.contains("event: ping\n") && seen.contains("event: secret:update\n")) {
        use futures_util::StreamExt;
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            _ => panic!("through the proxy, got only: {seen:?}"),
        }
    }
    assert!(seen.contains("\"eventType\":\"secret:update\""), "{seen}");
}

#[test]
fn prometheus_config_and_alert_rules_are_valid() {
    let Some(promtool) = tool("promtool", "apt-get install prometheus") else {
        return;
    };
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "config"])
        .arg(repo_path("docker/prometheus.yml")));
    assert!(ok, "promtool check config: {out}");
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo_path("docker/alerts.yml")));
    assert!(ok, "promtool check rules: {out}");
    assert!(out.contains("7 rules found"), "{out}");
}

#[test]
fn the_compose_herald_config_loads() {
    let (ok, out) = run(Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["config", "print", "--config"])
        .arg(repo_path("docker/herald.toml")));
    assert!(ok, "{out}");
    assert!(out.contains("nats://nats1:4222"), "{out}");
}

/// The median of `v` (sorted in place).
fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn the_shipped_haproxy_config_adds_no_delay_to_streams() {
    if tool("haproxy", "apt-get install haproxy").is_none() {
        return;
    }
    let h = HeraldBuilder::new().start();
    let lb = common::haproxy::Haproxy::start(&[(h.public.port(), h.admin.port())]).await;
    let token = token_for("reader", Duration::from_secs(3600));
    let body = serde_json::json!({"projectId": "p1", "register": [{"event": "secret:created"}]});
    let through = h
        .http
        .post(lb.url(SUBSCRIBE))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut through = SseClient::open(through).await;
    let mut direct = h.subscribe(&token, &body).await;
    let writer = token_for("writer", Duration::from_secs(3600));
    let (mut via_lb, mut straight) = (Vec::new(), Vec::new());
    for i in 0..15 {
        let sent = Instant::now();
        h.publish(
            &writer,
            &event("secret:created", "p1", "prod", &format!("/e{i}")),
        )
        .await;
        let (a, b) = tokio::join!(
            async {
                through.next_event().await;
                sent.elapsed()
            },
            async {
                direct.next_event().await;
                sent.elapsed()
            }
        );
        via_lb.push(a);
        straight.push(b);
        // Spaced out, as events are: Nagle's algorithm holds a small write
        // back while an earlier one waits for its (delayed) acknowledgement.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (lb_p50, direct_p50) = (median(&mut via_lb), median(&mut straight));
    eprintln!("delivery p50: {lb_p50:?} through haproxy, {direct_p50:?} direct");
    assert!(
        lb_p50 < direct_p50 + Duration::from_millis(20),
        "haproxy adds {:?} to a stream (p50 {lb_p50:?} vs {direct_p50:?} direct)",
        lb_p50.saturating_sub(direct_p50)
    );
}
