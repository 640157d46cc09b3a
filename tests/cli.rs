//! The command line: dev mode, refusing to start without a key, token minting,
//! config printing, policy checking.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn herald() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.env_remove("HERALD_AUTH__HS_SECRET").stdin(Stdio::null());
    c
}

/// The caller `token` names, verified with configured keys (which never wait).
fn verified(v: &herald::auth::Verifier, token: &str) -> herald::auth::Caller {
    futures_util::FutureExt::now_or_never(v.verify(token.trim()))
        .expect("configured keys never wait")
        .unwrap()
}

#[test]
fn serve_without_a_key_refuses_to_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("herald.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = herald()
        .current_dir(dir.path())
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("auth.hs_secret")
            && err.contains("HERALD_AUTH__HS_SECRET")
            && err.contains("--dev"),
        "{err}"
    );
}

#[test]
fn unknown_config_keys_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("herald.toml"),
        "[stream]\nheartbeats = \"1s\"\n",
    )
    .unwrap();
    let out = herald()
        .current_dir(dir.path())
        .args(["serve", "--dev"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("heartbeats"));
    let out = herald()
        .args(["serve", "--config", "/nonexistent/herald.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn config_print_redacts_secrets_and_shows_layers() {
    let dir = tempfile::tempdir().unwrap();
    let out = herald()
        .current_dir(dir.path())
        .args(["config", "print"])
        .env(
            "HERALD_AUTH__HS_SECRET",
            "super-secret-value-super-secret-value",
        )
        .env("HERALD_STREAM__HEARTBEAT", "7s")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("super-secret-value"), "{text}");
    assert!(
        text.contains("<redacted>") && text.contains("heartbeat = \"7s\""),
        "{text}"
    );
}

#[test]
fn token_mint_prints_a_token_the_verifier_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = herald()
        .current_dir(dir.path())
        .args(["token", "mint", "--sub", "alice", "--ttl", "10m"])
        .env("HERALD_AUTH__HS_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let v = herald::auth::Verifier::from_config(&herald::config::AuthConfig {
        hs_secret: Some(SECRET.into()),
        ..Default::default()
    })
    .unwrap();
    let id = verified(&v, &token);
    assert_eq!(id.identity.as_str(), "alice");
    assert!(
        id.remaining() <= Duration::from_secs(600) && id.remaining() > Duration::from_secs(590)
    );
    // RS256 with a private key file.
    let out = herald()
        .current_dir(dir.path())
        .args(["token", "mint", "--sub", "bob", "--alg", "RS256", "--key"])
        .arg(repo_path("tests/fixtures/rsa_private.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With claim mapping, the identity goes in the configured claim.
    let out = herald()
        .current_dir(dir.path())
        .args(["token", "mint", "--sub", "m1"])
        .env("HERALD_AUTH__HS_SECRET", SECRET)
        .env("HERALD_AUTH__IDENTITY_CLAIM", "identityId")
        .env("HERALD_AUTH__IDENTITY_PREFIX", "infisical:")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("infisical:m1"));
    let mapped = herald::auth::Verifier::from_config(&herald::config::AuthConfig {
        hs_secret: Some(SECRET.into()),
        identity_claim: "identityId".into(),
        identity_prefix: "infisical:".into(),
        ..Default::default()
    })
    .unwrap();
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(verified(&mapped, &token).identity.as_str(), "infisical:m1");
    // Without a key it says what to set.
    let out = herald()
        .current_dir(dir.path())
        .args(["token", "mint", "--sub", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HERALD_AUTH__HS_SECRET"));
}

#[test]
fn policy_check_reports_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "# ok\np, a, p1, secret:created, subscribe, prod, /x, allow\np, a, p1, secret:nope, read, prod, /x, allow\ng, a\n").unwrap();
    let out = herald()
        .current_dir(dir.path())
        .args(["policy", "check", "--model"])
        .arg(repo_path("policies/model.conf"))
        .arg("--policy")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let bad_name = bad.display().to_string();
    assert!(
        text.contains(&format!("{bad_name}:3: event type")),
        "{text}"
    );
    assert!(text.contains(&format!("{bad_name}:3: action")), "{text}");
    assert!(
        text.contains(&format!("{bad_name}:4: a `g` line")),
        "{text}"
    );
    let out = herald()
        .current_dir(repo_path("."))
        .args(["policy", "check"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn dev_mode_prints_working_tokens_and_binds_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = herald()
        .current_dir(dir.path())
        .args([
            "serve",
            "--dev",
            "--listen",
            "0.0.0.0:0",
            "--admin-listen",
            "0.0.0.0:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = l.trim_end().ends_with("/api/v1/events/publish");
            lines.push(l);
            if done {
                let _ = tx.send(lines.clone());
            }
        }
    });
    let lines = rx.recv_timeout(WAIT).expect("dev banner");
    let ready = lines[0].clone();
    assert!(
        ready.contains("public=127.0.0.1:") && ready.contains("admin=127.0.0.1:"),
        "dev mode binds loopback: {ready}"
    );
    let public = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("public="))
        .unwrap()
        .to_owned();
    let get = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .to_owned()
    };
    let (sub, publ) = (get("SUB_TOKEN="), get("PUB_TOKEN="));
    // The printed request bodies, as the curl commands send them.
    let body_of = |marker: &str| -> serde_json::Value {
        let i = lines.iter().position(|l| l.starts_with(marker)).unwrap();
        let line = lines[i + 1..]
            .iter()
            .find(|l| l.trim_start().starts_with("-d '"))
            .unwrap();
        let json = line
            .trim_start()
            .trim_start_matches("-d '")
            .split("' ")
            .next()
            .unwrap();
        serde_json::from_str(json).unwrap()
    };
    let (sub_body, pub_body) = (body_of("# Terminal 1"), body_of("# Terminal 2"));
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{public}{SUBSCRIBE}"))
        .bearer_auth(&sub)
        .json(&sub_body)
        .send()
        .await
        .unwrap();
    let mut stream = SseClient::open(resp).await;
    let r = http
        .post(format!("http://{public}{PUBLISH}"))
        .bearer_auth(&publ)
        .json(&pub_body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let ev = stream.next_event().await;
    assert_eq!(ev.json()["data"], pub_body["data"]);
    assert!(
        lines.iter().any(|l| l.contains("curl -N")),
        "a curl subscribe command is printed"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `section.key` for every `key = value` line of a TOML text, commented
/// (`# key = …`) or not, with the value when it is not commented.
fn documented_keys(text: &str) -> Vec<(String, Option<String>)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (commented, body) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        let Some((key, value)) = body.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            continue;
        }
        let value = value
            .split(" #")
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        out.push((format!("{section}.{key}"), (!commented).then_some(value)));
    }
    out
}

#[test]
fn the_example_config_shows_every_key_with_its_default() {
    let out = herald()
        .args(["config", "print"])
        .env_remove("HERALD_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let example = std::fs::read_to_string(repo_path("herald.toml")).unwrap();
    let documented = documented_keys(&example);
    let mut missing = Vec::new();
    // Every printed key, nested sections (`[ingest.webhook]`) flattened.
    fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
        for (k, v) in t {
            let name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v.as_table() {
                Some(inner) if !prefix.is_empty() && inner.values().any(|x| !x.is_table()) => {
                    flatten(&name, inner, out)
                }
                Some(inner) if prefix.is_empty() => flatten(&name, inner, out),
                _ => out.push((name, v.clone())),
            }
        }
    }
    let mut keys = Vec::new();
    flatten("", &printed, &mut keys);
    for (name, default) in &keys {
        let name = name.clone();
        {
            match documented.iter().find(|(k, _)| *k == name) {
                None => missing.push(name),
                Some((_, Some(shown))) => {
                    let shown: toml::Value = toml::from_str::<toml::Table>(&format!("v = {shown}"))
                        .unwrap_or_else(|e| panic!("herald.toml {name}: {e}"))["v"]
                        .clone();
                    // Durations may be spelled differently ("24h", "1day").
                    let as_duration = |v: &toml::Value| {
                        v.as_str().and_then(|s| humantime::parse_duration(s).ok())
                    };
                    if as_duration(&shown).is_some() && as_duration(&shown) == as_duration(default)
                    {
                        continue;
                    }
                    assert_eq!(
                        &shown, default,
                        "herald.toml shows {name} with another value than its default"
                    );
                }
                Some((_, None)) => {} // an optional key, shown commented
            }
        }
    }
    assert!(missing.is_empty(), "herald.toml does not show {missing:?}");
}
