//! Live policy edits against the real binary: reload on save, rename-replace
//! and SIGHUP, revocation of streams no longer allowed, broken edits keeping the
//! policy in force, and `herald policy explain`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);

const BASE: &str = "
p, writer, *, secret:*, publish, *, /**, allow
p, alice, p1, secret:*, subscribe, *, /apps/**, allow
p, bob, p1, secret:*, subscribe, *, /**, allow
";

fn body(path: &str) -> Value {
    json!({"projectId": "p1", "register": [
        {"event": "secret:created", "conditions": {"secretPath": path}},
        {"event": "secret:deleted", "conditions": {"secretPath": "/apps/sentinel"}}]})
}

/// Publishes `paths` then a sentinel; returns what `s` saw before the sentinel.
async fn seen_before_sentinel(h: &Herald, s: &mut SseClient, paths: &[&str]) -> Vec<String> {
    let w = token_for("writer", HOUR);
    for p in paths {
        h.publish(&w, &event("secret:created", "p1", "prod", p))
            .await;
    }
    h.publish(&w, &event("secret:deleted", "p1", "prod", "/apps/sentinel"))
        .await;
    s.paths_until("/apps/sentinel").await
}

fn write_policy(h: &Herald, text: &str) {
    std::fs::write(&h.policy_path, text).unwrap();
}

#[tokio::test]
async fn saving_a_policy_revokes_streams_no_longer_allowed() {
    let h = HeraldBuilder::new().policy(BASE).start();
    let mut alice = h.subscribe(&token_for("alice", HOUR), &body("/apps")).await;
    assert_eq!(
        seen_before_sentinel(&h, &mut alice, &["/apps/a"]).await,
        vec!["/apps/a"]
    );
    let mut bob = h.subscribe(&token_for("bob", HOUR), &body("/apps")).await;
    seen_before_sentinel(&h, &mut bob, &[]).await;
    assert_eq!(
        alice.next_event().await.json()["secretpath"],
        "/apps/sentinel",
        "bob's sentinel reached alice too"
    );
    // alice loses her grant; bob keeps his.
    write_policy(
        &h,
        &BASE.replace(
            "p, alice, p1, secret:*, subscribe, *, /apps/**, allow\n",
            "",
        ),
    );
    let ev = alice.next_event().await;
    assert_eq!(ev.event.as_deref(), Some("error"));
    let v = ev.json();
    assert_eq!(v["code"], "permission_revoked");
    assert!(
        v["registration"]
            .as_str()
            .unwrap()
            .starts_with("register[0]: secret:created"),
        "{v}"
    );
    assert!(
        alice.until_end().await.is_empty(),
        "the stream ends after the error"
    );
    assert_eq!(
        h.wait_policy(|v| v["generation"] == 2).await["last_error"],
        Value::Null
    );
    assert_eq!(
        seen_before_sentinel(&h, &mut bob, &["/apps/b"]).await,
        vec!["/apps/b"],
        "bob is still served"
    );
    assert_eq!(
        h.metric("herald_streams_closed_total{reason=\"permission_revoked\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("herald_policy_reloads_total{result=\"success\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_narrowed_grant_keeps_the_stream_and_filters_deliveries() {
    let h = HeraldBuilder::new().policy(BASE).start();
    let mut alice = h.subscribe(&token_for("alice", HOUR), &body("/apps")).await;
    write_policy(
        &h,
        &BASE.replace(
            "p, alice, p1, secret:*, subscribe, *, /apps/**, allow",
            "p, alice, p1, secret:*, subscribe, *, /apps/db/**, allow\np, alice, p1, secret:*, subscribe, *, /apps/sentinel, allow",
        ),
    );
    h.wait_policy(|v| v["generation"] == 2).await;
    let seen =
        seen_before_sentinel(&h, &mut alice, &["/apps/web", "/apps/db/x", "/apps/web/y"]).await;
    assert_eq!(seen, vec!["/apps/db/x"]);
}

#[tokio::test]
async fn a_broken_edit_keeps_the_policy_in_force() {
    let h = HeraldBuilder::new().policy(BASE).start();
    let mut alice = h.subscribe(&token_for("alice", HOUR), &body("/apps")).await;
    // Adds carol, but line 6 is broken: nothing of the file may take effect.
    write_policy(
        &h,
        &format!("{BASE}p, carol, p1, secret:*, subscribe, *, /**, allow\np, carol, p1, secret:*, subscribe, *, /x/../y, allow\n"),
    );
    let v = h.wait_policy(|v| v["last_error"].is_array()).await;
    assert_eq!(v["generation"], 1, "the previous policy stays in force");
    let err = v["last_error"][0].as_str().unwrap();
    assert!(
        err.contains("policy.csv:6:") && err.contains("path"),
        "{err}"
    );
    assert_eq!(
        h.metric("herald_policy_reloads_total{result=\"error\"}")
            .await,
        1.0
    );
    let (status, _) = h.admin_json("/readyz").await;
    assert_eq!(status, 200, "still ready: the old policy governs");
    assert_eq!(
        seen_before_sentinel(&h, &mut alice, &["/apps/a"]).await,
        vec!["/apps/a"],
        "alice is still served"
    );
    let r = h
        .subscribe_raw(Some(&token_for("carol", HOUR)), &body("/apps"))
        .await;
    assert_eq!(
        r.status(),
        403,
        "the broken file's new grant is not in force"
    );
    // Fixing the file applies it.
    write_policy(
        &h,
        &format!("{BASE}p, carol, p1, secret:*, subscribe, *, /**, allow\n"),
    );
    let v = h.wait_policy(|v| v["generation"].as_u64() > Some(1)).await;
    assert_eq!(v["last_error"], Value::Null);
    let _carol = h.subscribe(&token_for("carol", HOUR), &body("/apps")).await;
}

#[tokio::test]
async fn rename_and_replace_saves_are_seen() {
    let h = HeraldBuilder::new().policy(BASE).start();
    let tmp = h.policy_path.with_extension("csv.tmp");
    std::fs::write(
        &tmp,
        format!("{BASE}p, carol, p1, secret:*, subscribe, *, /**, allow\n"),
    )
    .unwrap();
    std::fs::rename(&tmp, &h.policy_path).unwrap();
    h.wait_policy(|v| v["generation"] == 2).await;
    let _carol = h.subscribe(&token_for("carol", HOUR), &body("/apps")).await;
}

#[tokio::test]
async fn sighup_reloads_when_watching_is_off() {
    let h = HeraldBuilder::new()
        .policy(BASE)
        .env("POLICY__WATCH", "false")
        .start();
    write_policy(
        &h,
        &format!("{BASE}p, carol, p1, secret:*, subscribe, *, /**, allow\n"),
    );
    let r = h
        .subscribe_raw(Some(&token_for("carol", HOUR)), &body("/apps"))
        .await;
    assert_eq!(r.status(), 403, "not reloaded without a signal");
    h.signal("HUP");
    let v = h.wait_policy(|v| v["generation"] == 2).await;
    assert_eq!(v["last_error"], Value::Null);
    let _carol = h.subscribe(&token_for("carol", HOUR), &body("/apps")).await;
}

fn explain(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .current_dir(repo_path("."))
        .args(["policy", "explain"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn explain_names_the_deciding_lines_and_roles() {
    let base = [
        "--project",
        "p1",
        "--event",
        "secret:created",
        "--env",
        "prod",
    ];
    let (code, out) = explain(
        &[
            &base[..],
            &["--sub", "dev-subscriber", "--path", "/apps/db"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("allow: "), "{out}");
    assert!(
        out.contains("policy.csv:10: p, role:reader, *, secret:*, subscribe, *, /**, allow"),
        "{out}"
    );
    assert!(
        out.contains("via dev-subscriber -> role:reader (line 20, domain *)"),
        "{out}"
    );

    let (code, out) = explain(
        &[
            &base[..],
            &["--sub", "dev-subscriber", "--path", "/internal/keys"],
        ]
        .concat(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("deny: "), "{out}");
    assert!(
        out.contains("decided by deny rule(s):\n    policies/policy.csv:11:"),
        "{out}"
    );

    let (code, out) = explain(&[&base[..], &["--sub", "nobody", "--path", "/apps"]].concat());
    assert_eq!(code, 1);
    assert!(out.contains("no rule matches: denied by default"), "{out}");

    let (code, _) = explain(&[&base[..], &["--sub", "x", "--path", "no-slash"]].concat());
    assert_eq!(code, 2);

    // Roles a token's claims would give (auth.roles_claim): shown as such.
    let (code, out) = explain(
        &[
            &base[..],
            &[
                "--sub",
                "nobody",
                "--path",
                "/apps",
                "--role",
                "role:reader",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("allow: nobody [role:reader] subscribe"),
        "{out}"
    );
    assert!(
        out.contains("via nobody -> role:reader (from the token's claims)"),
        "{out}"
    );
    let (code, _) = explain(
        &[
            &base[..],
            &["--sub", "nobody", "--path", "/apps", "--role", "reader"],
        ]
        .concat(),
    );
    assert_eq!(code, 2, "a role is named role:…");
}
