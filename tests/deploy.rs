//! The deployment files under docker/ are checked by the real tools: haproxy
//! parses haproxy.cfg, promtool checks prometheus.yml and the alert rules,
//! herald loads docker/herald.toml.

mod common;

use std::process::Command;

use common::{repo_path, tool};

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
