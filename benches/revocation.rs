//! Revocation latency: how long from saving a policy file that takes a grant
//! away to the client holding the stream receiving `permission_revoked`.
//!
//! Run: `cargo bench --bench revocation` (`REVOKE_ROUNDS`, default 20). Prints
//! the latency for a file save (watcher, `policy.watch_interval` 250 ms) and for
//! a save followed by SIGHUP (watcher off).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use herald::auth::Signer;
use serde_json::{json, Value};

const SECRET: &str = "herald-bench-secret-0123456789abcdef";
const GRANT: &str = "p, alice, p1, secret:*, subscribe, *, /**, allow\n";
const NO_GRANT: &str = "p, bob, p1, secret:*, subscribe, *, /**, allow\n";

struct Herald {
    child: Child,
    public: String,
    admin: String,
    policy: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(watch: bool) -> Herald {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.csv");
    // Every round first grants, then takes the grant away: start without it.
    std::fs::write(&policy, NO_GRANT).unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/model.conf");
    std::fs::write(
        dir.path().join("herald.toml"),
        format!(
            "[auth]\nhs_secret = \"{SECRET}\"\n[policy]\nmodel = {:?}\npolicy = \"policy.csv\"\nwatch = {watch}\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .current_dir(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("HERALD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start herald");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .expect("ready line")
            .to_owned()
    };
    Herald {
        public: addr("public="),
        admin: addr("admin="),
        child,
        policy,
        _dir: dir,
    }
}

async fn generation(http: &reqwest::Client, h: &Herald) -> u64 {
    let v: Value = http
        .get(format!("http://{}/admin/policy", h.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["generation"].as_u64().unwrap_or(0)
}

/// One round: grant, subscribe, take the grant away, time until the error arrives.
async fn round(http: &reqwest::Client, h: &Herald, token: &str, hup: bool) -> Duration {
    let before = generation(http, h).await;
    std::fs::write(&h.policy, GRANT).unwrap();
    if hup {
        signal(h, "HUP");
    }
    while generation(http, h).await == before {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let resp = http
        .post(format!(
            "http://{}/api/v1/events/subscribe/project-events",
            h.public
        ))
        .bearer_auth(token)
        .json(&json!({"projectId": "p1", "register": [{"event": "secret:created"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    body.next().await; // the retry: hint
    let saved = Instant::now();
    std::fs::write(&h.policy, NO_GRANT).unwrap();
    if hup {
        signal(h, "HUP");
    }
    let mut seen = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        seen.extend_from_slice(&chunk);
        if String::from_utf8_lossy(&seen).contains("permission_revoked") {
            return saved.elapsed();
        }
    }
    panic!("the stream ended without permission_revoked");
}

fn signal(h: &Herald, name: &str) {
    Command::new("kill")
        .args([&format!("-{name}"), &h.child.id().to_string()])
        .status()
        .unwrap();
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name}: {} rounds, min {:.1} ms, p50 {:.1} ms, max {:.1} ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    );
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("REVOKE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let token = Signer::hmac(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes())
        .mint("alice", Duration::from_secs(3600), None, None)
        .unwrap();
    let http = reqwest::Client::new();
    for (name, watch, hup) in [
        ("file save (watcher, 250 ms interval)", true, false),
        ("file save + SIGHUP (watcher off)", false, true),
    ] {
        let h = start(watch);
        let mut v = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            v.push(round(&http, &h, &token, hup).await);
        }
        summary(name, v);
    }
}
