//! The `infisical` dialect, read the way Infisical's own clients read a
//! stream (`../shared/infisical.md`, from their sources): the Kubernetes
//! operator's line parser (a frame is dispatched only with an `event:`
//! line; only `event: ping` counts as liveness) and the CLI proxy's
//! (`data:` lines only, joined and JSON-decoded into its payload struct).

mod common;

use std::time::Duration;

use common::infisical::{cli_body, cli_decode, open_at, operator_body, read_paths, Operator};
use common::{event, token_for, Herald, HeraldBuilder, SUBSCRIBE, WAIT};
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);
fn start() -> Herald {
    HeraldBuilder::new()
        .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0")
        .env("STREAM__HEARTBEAT", "300ms")
        .start()
}

async fn open(h: &Herald, token: &str, body: &Value) -> reqwest::Response {
    let url = format!(
        "http://{}{SUBSCRIBE}",
        h.infisical.expect("an infisical listener")
    );
    open_at(&url, token, body).await
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
    // Then the line its scanner fails on: it reconnects after 1 s instead
    // of waiting for its 2-minute watchdog.
    assert!(
        op.next().await.is_none() && op.read_error,
        "the stream ends"
    );
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
    // And ends cleanly: the operator comes back at its watchdog (2 min),
    // not every second.
    assert!(
        over.next().await.is_none() && over.ended && !over.read_error,
        "and ends"
    );
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

#[tokio::test]
async fn clients_without_last_event_id_resume_where_they_left_off() {
    let h = HeraldBuilder::new()
        .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0")
        .env("STREAM__REPLAY_BUFFER", "8")
        .env("REMEMBER__WINDOW", "3s")
        .env("REMEMBER__SAVE_EVERY", "50ms")
        // Exactly where the stream stood (the default sends again what the
        // last 150 s wrote, in case the connection had died unnoticed).
        .env("REMEMBER__MARGIN", "0s")
        .start();
    let token = token_for("reader", HOUR);
    let saves = "herald_position_saves_total{result=\"ok\"}";
    let mut op = Operator::new(open(&h, &token, &cli_body()).await);
    // Saved once it opens (where the bus stands), then after each event.
    common::eventually(WAIT, "the opening position saved", || async {
        (h.metric(saves).await >= 1.0).then_some(())
    })
    .await;
    publish(&h, "secret:updated", "/one", json!(["A"])).await;
    assert_eq!(read_paths(&mut op, 1).await[0].1, "/one");
    common::eventually(WAIT, "the position saved", || async {
        (h.metric(saves).await >= 2.0).then_some(())
    })
    .await;
    drop(op);
    // Missed while away, then a reconnect that sends what the CLI sends.
    publish(&h, "secret:updated", "/two", json!(["A"])).await;
    publish(&h, "secret:deleted", "/three", json!(["A"])).await;
    let mut op = Operator::new(open(&h, &token, &cli_body()).await);
    publish(&h, "secret:created", "/four", json!(["A"])).await;
    let got = read_paths(&mut op, 3).await;
    let paths: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["/two", "/three", "/four"],
        "{got:?}: nothing twice, nothing missed"
    );
    assert_eq!(
        h.metric("herald_position_recalls_total{result=\"resumed\"}")
            .await,
        1.0
    );
    // Another registration set is another client: nothing to resume, no gap.
    let mut other = Operator::new(open(&h, &token, &operator_body("/five")).await);
    publish(&h, "secret:updated", "/five", json!(["A"])).await;
    assert_eq!(
        read_paths(&mut other, 1).await,
        [("secret:update".into(), "/five".into())]
    );
    drop(other);

    // Away while more events than herald keeps were published: `gap` (the
    // operator re-fetches), then what is still kept (each purges the CLI).
    let before = h.metric(saves).await;
    publish(&h, "secret:updated", "/six", json!(["A"])).await;
    let got = read_paths(&mut op, 2).await;
    assert_eq!((got[0].1.as_str(), got[1].1.as_str()), ("/five", "/six"));
    common::eventually(WAIT, "the position saved", || async {
        (h.metric(saves).await > before).then_some(())
    })
    .await;
    drop(op);
    for i in 0..12 {
        publish(&h, "secret:updated", &format!("/gone{i}"), json!(["A"])).await;
    }
    let mut op = Operator::new(open(&h, &token, &cli_body()).await);
    let got = read_paths(&mut op, 9).await;
    assert_eq!(got[0].0, "gap", "{got:?}");
    let kept: Vec<&str> = got[1..].iter().map(|(_, p)| p.as_str()).collect();
    let want: Vec<String> = (4..12).map(|i| format!("/gone{i}")).collect();
    assert_eq!(kept, want);
    drop(op);

    // Away longer than the window: told `gap` (herald cannot say what was
    // missed), then live events.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut op = Operator::new(open(&h, &token, &cli_body()).await);
    publish(&h, "secret:updated", "/seven", json!(["A"])).await;
    let got = read_paths(&mut op, 2).await;
    assert_eq!(got[0].0, "gap", "{got:?}");
    assert_eq!(got[1].1, "/seven");
    assert_eq!(
        h.metric("herald_position_recalls_total{result=\"window_passed\"}")
            .await,
        1.0
    );
    // Native streams are not remembered unless configured.
    assert_eq!(
        h.metric("herald_position_recalls_total{result=\"new\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn after_a_kill_each_client_gets_what_it_missed_from_another_instance() {
    let nats = common::nats::NatsServer::start_jetstream();
    let settings = [
        ("REMEMBER__SAVE_EVERY", "100ms"),
        ("SHUTDOWN__GRACE", "0s"),
        ("SHUTDOWN__DRAIN_WINDOW", "300ms"),
    ];
    let common::infisical::Deployment { heralds, proxy, .. } =
        common::infisical::Deployment::start(&nats, 2, &settings).await;
    let url = proxy.url(SUBSCRIBE);
    let token = token_for("reader", HOUR);
    // Two resources of the operator (each its path) and two CLI proxies
    // sharing one machine identity (one key, every path).
    let clients: [Option<&str>; 4] = [Some("/apps"), None, None, Some("/db")];
    let body = |c: &Option<&str>| c.map_or_else(cli_body, operator_body);
    let wants = |c: &Option<&str>, p: &str| c.is_none_or(|only| only == p);
    let per_round = |c: &Option<&str>| if c.is_none() { 2 } else { 1 };
    let conns = |h: &Herald| {
        let url = h.admin_url("/metrics");
        async move {
            let text = reqwest::get(url).await.unwrap().text().await.unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("herald_connections "))
                .map_or(0, |v| v.parse::<f64>().unwrap() as usize)
        }
    };
    // Where least-connections put each stream.
    let mut streams = Vec::new();
    let mut placed = Vec::new();
    for c in &clients {
        let before = [conns(&heralds[0]).await, conns(&heralds[1]).await];
        streams.push(Operator::new(open_at(&url, &token, &body(c)).await));
        let after = [conns(&heralds[0]).await, conns(&heralds[1]).await];
        placed.push(usize::from(after[1] > before[1]));
    }
    // The instance to kill holds an operator stream and a CLI stream.
    let victim = (0..2)
        .find(|v| {
            let kinds: Vec<bool> = (0..4)
                .filter(|i| placed[*i] == *v)
                .map(|i| clients[i].is_none())
                .collect();
            kinds.contains(&true) && kinds.contains(&false)
        })
        .unwrap_or_else(|| panic!("placement {placed:?} puts no operator and CLI stream together"));
    let survivor = 1 - victim;
    let publish = |path: &'static str| {
        let h = &heralds[survivor];
        async move {
            let mut e = event("secret:updated", "p1", "prod", path);
            e["data"]["secretKeys"] = json!(["K"]);
            let r = h.publish_raw(&token_for("dev-publisher", HOUR), &e).await;
            assert_eq!(r.status(), 202);
        }
    };
    publish("/apps").await;
    publish("/db").await;
    for (c, s) in clients.iter().zip(streams.iter_mut()) {
        let got = read_paths(s, per_round(c)).await;
        assert_eq!(got.len(), per_round(c), "{c:?}: {got:?}");
    }
    let saves = "herald_position_saves_total{result=\"ok\"}";
    common::eventually(WAIT, "every stream's position saved", || async {
        let n = heralds[0].metric(saves).await + heralds[1].metric(saves).await;
        (n >= 4.0).then_some(())
    })
    .await;

    heralds[victim].signal("KILL");
    let gone = heralds[victim].admin_url("/healthz");
    common::eventually(WAIT, "the killed instance gone", || async {
        reqwest::get(&gone).await.is_err().then_some(())
    })
    .await;
    publish("/apps").await; // missed by the streams the killed instance held
    publish("/db").await;
    let mut back = Vec::new();
    let mut stayed = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let c = &clients[i];
        let got = read_paths(&mut s, per_round(c)).await;
        if placed[i] == victim {
            assert!(s.ended && got.is_empty(), "{c:?}: {got:?}");
            back.push(i);
        } else {
            assert_eq!(got.len(), per_round(c), "{c:?}: {got:?}");
            assert!(
                got.iter().all(|(e, p)| e == "secret:update" && wants(c, p)),
                "{got:?}"
            );
            stayed.push((i, s));
        }
    }
    // They come back as the clients do, without Last-Event-ID: what they
    // missed, then live events, each once. With the default margin (a
    // resume starts where the stream stood 150 s ago), what they had comes
    // again first.
    let mut reopened = Vec::new();
    for i in back {
        reopened.push((
            i,
            Operator::new(open_at(&url, &token, &body(&clients[i])).await),
        ));
    }
    publish("/apps").await;
    publish("/db").await;
    for (i, s) in reopened.iter_mut() {
        let c = &clients[*i];
        let got = read_paths(s, 3 * per_round(c)).await;
        let paths: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
        let want: Vec<&str> = ["/apps", "/db", "/apps", "/db", "/apps", "/db"]
            .into_iter()
            .filter(|p| wants(c, p))
            .collect();
        assert_eq!(paths, want, "{c:?} after the kill: {got:?}");
        assert!(
            got.iter().all(|(e, _)| e == "secret:update"),
            "no gap: {got:?}"
        );
    }
    for (i, s) in stayed.iter_mut() {
        let c = &clients[*i];
        let got = read_paths(s, per_round(c)).await;
        assert_eq!(got.len(), per_round(c), "{c:?}: {got:?}");
        assert!(got.iter().all(|(_, p)| wants(c, p)), "{got:?}");
    }
    let resumed = "herald_position_recalls_total{result=\"resumed\"}";
    assert_eq!(heralds[survivor].metric(resumed).await, 2.0);

    // Drained, through the proxy: `reconnect` (the operator re-fetches),
    // then the line its scanner fails on (it reconnects after 1 s, not at
    // its 2-minute watchdog).
    heralds[survivor].terminate();
    for (_, s) in reopened.iter_mut().chain(stayed.iter_mut()) {
        let told = s.next().await.expect("a reconnect event");
        assert_eq!(told.event, "reconnect");
        assert!(s.next().await.is_none() && s.read_error, "a read error");
    }
}

#[tokio::test]
async fn a_body_sent_too_slowly_is_refused_in_infisicals_shape() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = HeraldBuilder::new()
        .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0")
        .env("SERVER__BODY_READ_TIMEOUT", "300ms")
        .start();
    let mut tcp = tokio::net::TcpStream::connect(h.infisical.unwrap())
        .await
        .unwrap();
    let head = format!(
        "POST {SUBSCRIBE} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"projectId\"",
        token_for("reader", HOUR)
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["statusCode"], 408, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}
