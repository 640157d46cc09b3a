//! The public API as a contract: the OpenAPI document herald serves is valid
//! (openapi-spec-validator), and schemathesis, generating positive and
//! negative requests from it against a live herald, finds no server error
//! and no answer the document does not allow.
//!
//! The run here is bounded (`CONTRACT_EXAMPLES`, 20 per operation by
//! default, seed 1); `scripts/contract-long` runs it for longer from a
//! fresh seed.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const HOUR: Duration = Duration::from_secs(3600);

/// One identity that may do everything but a few carve-outs, so that the
/// run sees 2xx, 401 and 403 alike.
const CONTRACT_POLICY: &str = "
p, tester, *, secret:*, subscribe, *, /**, allow
p, tester, *, secret:*, subscribe, *, /internal/**, deny
p, tester, *, secret:*, publish, *, /**, allow
p, tester, denied, secret:*, publish, *, /**, deny
";

fn text(out: &Output) -> String {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The end of a long report is where the failures are summarized.
    let cut = all.len().saturating_sub(20_000);
    let cut = (cut..all.len())
        .find(|i| all.is_char_boundary(*i))
        .unwrap_or(0);
    all[cut..].to_owned()
}

#[tokio::test]
async fn the_served_openapi_document_is_the_repository_s_and_is_valid() {
    let h = HeraldBuilder::new().start();
    let resp = h
        .http
        .get(h.admin_url("/openapi.yaml"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/yaml");
    let served = resp.text().await.unwrap();
    let file = repo_path("src/http/openapi.yaml");
    assert_eq!(served, std::fs::read_to_string(&file).unwrap());
    // The routes herald serves are the document's.
    for route in [SUBSCRIBE, PUBLISH] {
        assert!(served.contains(&format!("\n  {route}:\n")), "{route}");
    }
    let Some(validator) = tool(
        "openapi-spec-validator",
        "pip install openapi-spec-validator",
    ) else {
        return;
    };
    let out = Command::new(validator).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_answer_outside_the_document() {
    let Some(st) = tool("st", "pip install schemathesis") else {
        return;
    };
    let h = HeraldBuilder::new()
        .policy(CONTRACT_POLICY)
        .log("herald=info,warn")
        // Streams end by themselves, so that every 200 stream is read to its end.
        .env("STREAM__MAX_LIFETIME", "1s")
        // The run's own pace must not be what it measures.
        .env("LIMITS__SUBSCRIBE_RATE", "100000")
        .env("LIMITS__SUBSCRIBE_BURST", "100000")
        // Ten paths of the longest kind: the document cannot state the
        // combined budget, so the run has room for every document-valid request.
        .env("LIMITS__MAX_REGISTRATION_BYTES", "16384")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "1000")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY", "1000")
        .start();
    let examples = std::env::var("CONTRACT_EXAMPLES").unwrap_or_else(|_| "20".to_owned());
    // A fixed seed here (the same cases every run); the long run picks its own.
    let seed = std::env::var("CONTRACT_SEED").unwrap_or_else(|_| "1".to_owned());
    let report = tempfile::tempdir().unwrap();
    let token = token_for("tester", HOUR);
    let out = tokio::task::spawn_blocking({
        let schema = h.admin_url("/openapi.yaml");
        let base = format!("http://{}", h.public);
        let report = report.path().to_owned();
        move || {
            Command::new(st)
                .args(["run", &schema, "--url", &base])
                .args(["--header", &format!("Authorization: Bearer {token}")])
                .args(["--checks", "all", "--mode", "all"])
                .args(["--phases", "examples,coverage,fuzzing"])
                .args(["--max-examples", &examples])
                .args(["--workers", "4", "--request-timeout", "0.5"])
                .args([
                    "--seed",
                    &seed,
                    "--generation-database",
                    "none",
                    "--no-color",
                ])
                .current_dir(&report)
                .env(
                    "SCHEMATHESIS_HOOKS",
                    repo_path("tests/fixtures/schemathesis_hooks.py"),
                )
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{}\n--- herald log ---\n{}",
        text(&out),
        h.log()
    );
}
