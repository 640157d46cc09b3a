//! Revocation latency: how long from saving a policy file that takes a grant
//! away to the client holding the stream receiving `permission_revoked`.
//!
//! Run: `cargo bench --bench revocation` (`REVOKE_ROUNDS`, default 20). Prints
//! the latency for a file save (watcher, `policy.watch_interval` 250 ms) and for
//! a save followed by SIGHUP (watcher off).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{eventually, token_for, Herald, HeraldBuilder, WAIT};
use futures_util::StreamExt;
use serde_json::json;

const GRANT: &str = "p, alice, p1, secret:*, subscribe, *, /**, allow\n";
const NO_GRANT: &str = "p, bob, p1, secret:*, subscribe, *, /**, allow\n";

fn start(watch: bool) -> Herald {
    // Every round first grants, then takes the grant away: start without it.
    HeraldBuilder::new()
        .policy(NO_GRANT)
        .env("POLICY__WATCH", &watch.to_string())
        .log("warn")
        .start()
}

async fn generation(h: &Herald) -> u64 {
    h.admin_json("/admin/policy").await.1["generation"]
        .as_u64()
        .unwrap_or(0)
}

/// One round: grant, subscribe, take the grant away, time until the error arrives.
async fn round(h: &Herald, token: &str, hup: bool) -> Duration {
    let before = generation(h).await;
    std::fs::write(&h.policy_path, GRANT).unwrap();
    if hup {
        h.signal("HUP");
    }
    eventually(WAIT, "the grant was never loaded", || async {
        (generation(h).await != before).then_some(())
    })
    .await;
    let resp = h
        .subscribe_raw(
            Some(token),
            &json!({"projectId": "p1", "register": [{"event": "secret:created"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    body.next().await; // the retry: hint
    let saved = Instant::now();
    std::fs::write(&h.policy_path, NO_GRANT).unwrap();
    if hup {
        h.signal("HUP");
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
    let token = token_for("alice", Duration::from_secs(3600));
    for (name, watch, hup) in [
        ("file save (watcher, 250 ms interval)", true, false),
        ("file save + SIGHUP (watcher off)", false, true),
    ] {
        let h = start(watch);
        let mut v = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            v.push(round(&h, &token, hup).await);
        }
        summary(name, v);
    }
}
