//! The `infisical` dialect, read the way Infisical's own clients read a
//! stream (`../shared/infisical.md`, from their sources): the Kubernetes
//! operator's line parser (a frame is dispatched only with an `event:`
//! line; only `event: ping` counts as liveness) and the CLI proxy's
//! (`data:` lines only, joined and JSON-decoded into its payload struct).

mod common;

use std::time::Duration;

use common::{event, token_for, Herald, HeraldBuilder, WAIT};
use futures_util::StreamExt;
use serde_json::{json, Value};

const SUBSCRIBE: &str = "/api/v1/events/subscribe/project-events";
const HOUR: Duration = Duration::from_secs(3600);
const EVENTS: [&str; 4] = [
    "secret:create",
    "secret:update",
    "secret:delete",
    "secret:import-mutation",
];

fn start() -> Herald {
    HeraldBuilder::new()
        .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0")
        .env("STREAM__HEARTBEAT", "300ms")
        .start()
}

/// What the operator sends for one resource (its headers and body).
fn operator_body(path: &str) -> Value {
    let conditions = json!({"secretPath": path, "environmentSlug": "prod"});
    let register: Vec<Value> = EVENTS
        .iter()
        .map(|e| json!({"event": e, "conditions": conditions}))
        .collect();
    json!({"projectId": "p1", "register": register})
}

/// What the CLI proxy sends: one stream per project, no conditions.
fn cli_body() -> Value {
    let register: Vec<Value> = EVENTS.iter().map(|e| json!({"event": e})).collect();
    json!({"projectId": "p1", "register": register})
}

async fn open(h: &Herald, token: &str, body: &Value) -> reqwest::Response {
    let url = format!(
        "http://{}{SUBSCRIBE}",
        h.infisical.expect("an infisical listener")
    );
    reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .header("connection", "keep-alive")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// One event as the operator dispatches it.
#[derive(Debug, Clone)]
struct Dispatched {
    event: String,
    id: Option<String>,
    data: String,
}

/// The operator's reading of a stream: `field:value` lines (one leading
/// space dropped), `data` joined with `\n`, a frame dispatched only when it
/// has an `event:` line (the data of one without stays pending).
struct Operator {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
    event: Option<String>,
    id: Option<String>,
    data: Vec<String>,
    pings: usize,
    lines: Vec<String>,
    /// The stream ended (not a read time-out).
    ended: bool,
}

impl Operator {
    fn new(resp: reqwest::Response) -> Operator {
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Operator {
            body: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            event: None,
            id: None,
            data: Vec::new(),
            pings: 0,
            lines: Vec::new(),
            ended: false,
        }
    }

    /// The next dispatched event other than `ping` (pings are counted).
    async fn next(&mut self) -> Option<Dispatched> {
        loop {
            while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let line = String::from_utf8(line[..line.len() - 1].to_vec()).unwrap();
                assert!(
                    line.len() < 64 * 1024,
                    "a line the operator's scanner refuses"
                );
                self.lines.push(line.clone());
                if line.is_empty() {
                    let Some(event) = self.event.take() else {
                        continue; // no event: line: the data waits for the next one
                    };
                    let d = Dispatched {
                        event,
                        id: self.id.clone(),
                        data: std::mem::take(&mut self.data).join("\n"),
                    };
                    if d.event == "ping" {
                        self.pings += 1;
                        continue;
                    }
                    return Some(d);
                }
                let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
                let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                match field {
                    "event" => self.event = Some(value),
                    "id" => self.id = Some(value),
                    "data" => self.data.push(value),
                    _ => {}
                }
            }
            match tokio::time::timeout(WAIT, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(_) => {
                    self.ended = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }
}

/// The CLI proxy's payload struct, as it decodes a frame's joined data.
fn cli_decode(d: &Dispatched) -> Option<(String, Value)> {
    let joined: String = d.data.lines().map(str::trim).collect();
    let v: Value = serde_json::from_str(&joined).ok()?;
    let data = v.get("data")?;
    Some((
        data.get("eventType")?.as_str()?.to_owned(),
        data.get("payload")?.clone(),
    ))
}

async fn publish(h: &Herald, ty: &str, path: &str, keys: Value) {
    let mut e = event(ty, "p1", "prod", path);
    e["data"]["secretKeys"] = keys;
    let r = h.publish_raw(&token_for("dev-publisher", HOUR), &e).await;
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn every_event_type_reads_as_infisical_writes_it() {
    let h = start();
    let mut op = Operator::new(open(&h, &token_for("reader", HOUR), &cli_body()).await);
    publish(&h, "secret:created", "/apps", json!(["A"])).await;
    publish(
        &h,
        "secret:updated",
        "/apps",
        json!(["DB_PASSWORD", "DB_USER"]),
    )
    .await;
    publish(&h, "secret:deleted", "/apps", json!([])).await;
    publish(&h, "secret:import-mutation", "/apps", json!([])).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(op.next().await.expect("an event"));
    }
    let names: Vec<&str> = got.iter().map(|d| d.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "secret:create",
            "secret:update",
            "secret:delete",
            "secret:import-mutation"
        ]
    );
    assert!(got
        .iter()
        .all(|d| d.id.as_deref().is_some_and(|i| i.parse::<u64>().is_ok())));
    let decoded: Vec<(String, Value)> = got
        .iter()
        .map(|d| cli_decode(d).expect("the CLI decodes it"))
        .collect();
    assert_eq!(
        decoded[0],
        (
            "secret:create".into(),
            json!([{"environment": "prod", "secretPath": "/apps", "secretKey": "A"}])
        )
    );
    assert_eq!(
        decoded[1].1.as_array().unwrap().len(),
        2,
        "one item per key"
    );
    assert_eq!(
        decoded[2].1,
        json!([{"environment": "prod", "secretPath": "/apps"}]),
        "no keys: one item"
    );
    assert_eq!(
        decoded[3].1,
        json!({"environment": "prod", "secretPath": "/apps"}),
        "import-mutation: one object"
    );
    // The native listener still writes herald's own dialect.
    let mut native = h
        .subscribe(
            &token_for("reader", HOUR),
            &common::registration("p1", "secret:updated", None, None),
        )
        .await;
    publish(&h, "secret:updated", "/native", json!(["K"])).await;
    let ev = native.next_event().await;
    assert_eq!(ev.event.as_deref(), Some("secret:updated"));
    assert_eq!(ev.json()["specversion"], "1.0", "a CloudEvent");
}

#[tokio::test]
async fn the_operator_sees_pings_and_exact_paths() {
    let h = start();
    let token = token_for("reader", HOUR);
    let mut exact = Operator::new(open(&h, &token, &operator_body("/apps")).await);
    let mut tree = Operator::new(open(&h, &token, &operator_body("/apps/**")).await);
    publish(&h, "secret:updated", "/apps/db", json!(["K"])).await;
    publish(&h, "secret:updated", "/apps", json!(["K"])).await;
    let first = cli_decode(&exact.next().await.unwrap()).unwrap();
    assert_eq!(
        first.1[0]["secretPath"], "/apps",
        "a plain path is that folder only"
    );
    let t1 = cli_decode(&tree.next().await.unwrap()).unwrap();
    let t2 = cli_decode(&tree.next().await.unwrap()).unwrap();
    assert_eq!(
        (t1.1[0]["secretPath"].clone(), t2.1[0]["secretPath"].clone()),
        (json!("/apps/db"), json!("/apps"))
    );
    // Liveness: `event: ping` at the heartbeat (300 ms here).
    let before = exact.pings;
    let quiet = tokio::time::timeout(Duration::from_millis(2000), exact.next()).await;
    assert!(quiet.is_err(), "nothing but pings");
    assert!(
        exact.pings - before >= 3,
        "{} pings in 2 s",
        exact.pings - before
    );
    // No retry: line, no comment heartbeat: only what the operator reads.
    assert!(
        exact
            .lines
            .iter()
            .all(|l| !l.starts_with("retry:") && !l.starts_with(':')),
        "{:?}",
        exact.lines
    );
}

#[tokio::test]
async fn refusals_and_revocations_carry_a_message() {
    let h = start();
    let bad = open(&h, "not-a-token", &cli_body()).await;
    assert_eq!(bad.status(), 401);
    let v: Value = bad.json().await.unwrap();
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(v["statusCode"], 401);
    let missing = reqwest::get(format!("http://{}/nope", h.infisical.unwrap()))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let v: Value = missing.json().await.unwrap();
    assert!(v["message"].is_string(), "{v}");

    let mut op = Operator::new(
        open(
            &h,
            &token_for("prod-db", HOUR),
            &operator_body("/apps/db/**"),
        )
        .await,
    );
    // The policy no longer grants prod-db: error with a message, then the end.
    let policy = std::fs::read_to_string(&h.policy_path).unwrap();
    let without: String = policy
        .lines()
        .filter(|l| !l.contains("prod-db"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&h.policy_path, without).unwrap();
    h.signal("HUP");
    let err = op.next().await.expect("an error event");
    assert_eq!(err.event, "error");
    let m: Value = serde_json::from_str(&err.data).unwrap();
    assert!(
        m["message"]
            .as_str()
            .is_some_and(|s| !(s.contains("plan") && s.contains("not available"))),
        "{m}"
    );
    assert!(op.next().await.is_none() && op.ended, "the stream ends");
}

#[tokio::test]
async fn a_hundred_resources_of_one_identity_are_served_on_one_project() {
    let h = HeraldBuilder::new()
        .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0")
        .env("LIMITS__SUBSCRIBE_BURST", "1000")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY", "1000")
        .start();
    let token = token_for("reader", HOUR);
    let mut ops = Vec::new();
    for i in 0..100 {
        ops.push(Operator::new(
            open(&h, &token, &operator_body(&format!("/r{i}"))).await,
        ));
    }
    for i in [0, 57, 99] {
        publish(&h, "secret:updated", &format!("/r{i}"), json!(["K"])).await;
        let got = cli_decode(&ops[i].next().await.expect("its event")).unwrap();
        assert_eq!(got.1[0]["secretPath"], format!("/r{i}"));
    }
    // The 101st: a stream that says why, in a way the operator acts on
    // (never a status it would not retry).
    let mut over = Operator::new(open(&h, &token, &operator_body("/r100")).await);
    let err = over.next().await.expect("an error event");
    assert_eq!(err.event, "error");
    assert!(err.data.contains("100 open streams"), "{}", err.data);
    assert!(over.next().await.is_none() && over.ended, "and ends");
    // The native listener keeps its per-identity rule (5 per project,
    // every listener's streams counted).
    let native = h
        .subscribe_raw(
            Some(&token),
            &common::registration("p1", "secret:updated", None, None),
        )
        .await;
    assert_eq!(native.status(), 429);
    let v: Value = native.json().await.unwrap();
    assert_eq!(
        v["error"]["details"]["limit"],
        "connections_per_identity_project"
    );
    drop(ops);
}

#[tokio::test]
async fn the_project_cap_counts_every_identity_but_no_native_stream() {
    let h = HeraldBuilder::new()
        .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0")
        .env("LIMITS__INFISICAL_STREAMS_PER_PROJECT", "3")
        .start();
    // Native streams on the project: counted by their own rule only.
    let mut native = Vec::new();
    for _ in 0..4 {
        native.push(
            h.subscribe(
                &token_for("dev-subscriber", HOUR),
                &common::registration("p1", "secret:updated", None, None),
            )
            .await,
        );
    }
    let (reader, db) = (token_for("reader", HOUR), token_for("prod-db", HOUR));
    let _a = Operator::new(open(&h, &reader, &operator_body("/a")).await);
    let _b = Operator::new(open(&h, &db, &operator_body("/apps/db/**")).await);
    let _c = Operator::new(open(&h, &reader, &operator_body("/c")).await);
    let mut over = Operator::new(open(&h, &db, &operator_body("/apps/db/x")).await);
    let err = over.next().await.expect("an error event");
    assert_eq!(err.event, "error");
    assert!(err.data.contains("3 open streams"), "{}", err.data);
    assert_eq!(
        h.metric("herald_limit_rejections_total{limit=\"streams_per_project\"}")
            .await,
        1.0
    );
    drop(native);
}
