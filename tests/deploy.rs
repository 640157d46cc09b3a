//! The deployment files under docker/ are checked by the real tools: haproxy
//! parses haproxy.cfg, promtool checks prometheus.yml and the alert rules,
//! herald loads docker/herald.toml, and the shipped haproxy config adds no
//! delay to a stream.

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
