//! The deployment files under docker/ are checked by the real tools: haproxy
//! parses haproxy.cfg, promtool checks prometheus.yml and the alert rules,
//! herald loads docker/herald.toml.

mod common;

use std::process::Command;

use common::repo_path;

fn tool(name: &str, package: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| std::path::Path::new(d).join(name))
                .find(|p| p.is_file())
        });
    if found.is_none() {
        assert!(
            std::env::var_os("REQUIRE_TEST_TOOLS").is_none(),
            "{name} is required (apt-get install {package}); scripts/test installs it"
        );
        eprintln!("{name} not installed; skipping (scripts/test installs it)");
    }
    found
}

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
    let Some(haproxy) = tool("haproxy", "haproxy") else {
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
    let Some(promtool) = tool("promtool", "prometheus") else {
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
