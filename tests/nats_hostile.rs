//! Every byte from NATS is untrusted, and the link is judged by what it
//! delivers: a producer speaking the plain NATS protocol (tests/common/nats.rs
//! `RawProducer`) sends what no client library would, to a real nats-server,
//! and every herald instance keeps delivering every later valid event,
//! counting what it dropped by reason; a server that stops answering is
//! noticed by herald itself, within seconds, with its readiness telling the
//! truth.

mod common;

use std::time::Duration;

use common::nats::{urls_env, NatsServer, RawProducer};
use common::*;
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);

fn on_nats(nats: &NatsServer) -> HeraldBuilder {
    HeraldBuilder::new()
        .env("NATS__URLS", &urls_env(&[nats.url()]))
        .env("NATS__PRESENCE_INTERVAL", "200ms")
        .env("NATS__LIVENESS_INTERVAL", "200ms")
        .env("NATS__LIVENESS_TIMEOUT", "1s")
}

async fn ready(b: HeraldBuilder) -> Herald {
    let h = b.start();
    h.wait_ready(200).await;
    h
}

fn all_created(project: &str) -> Value {
    json!({"projectId": project, "register": [{"event": "secret:created"}]})
}

fn payload(project: &str, path: &str) -> Vec<u8> {
    event("secret:created", project, "prod", path)
        .to_string()
        .into_bytes()
}

fn subject(project: &str, tokens: &str) -> Vec<u8> {
    format!("herald.ev.{project}.prod.secret:created.{tokens}.~").into_bytes()
}

/// Publishes a valid event on `/{name}` (raw) until `stream` receives it;
/// returns the control events seen first (a `gap` after an outage).
async fn delivered_again(
    producer: &mut RawProducer,
    stream: &mut SseClient,
    project: &str,
    name: &str,
) -> Vec<String> {
    let path = format!("/{name}");
    let mut controls = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        producer
            .publish(&subject(project, name), &payload(project, &path))
            .await;
        producer.sync().await.expect("the producer is connected");
        while let Some(ev) = stream.next_within(Duration::from_millis(300)).await {
            if ev.is_meta() {
                continue;
            }
            match ev.event.as_deref() {
                Some("secret:created") if ev.json()["secretpath"] == path.as_str() => {
                    return controls;
                }
                Some("secret:created") => {}
                other => controls.push(format!("{}:{}", other.unwrap_or(""), ev.data)),
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} was never delivered after the hostile message; controls {controls:?}"
        );
    }
}

#[tokio::test]
async fn one_non_utf8_subject_never_silences_an_instance() {
    let nats = NatsServer::start();
    let a = ready(on_nats(&nats)).await;
    let b = ready(on_nats(&nats)).await;
    let t = token_for("reader", HOUR);
    let mut on_a = a.subscribe(&t, &all_created("p1")).await;
    let mut on_b = b.subscribe(&t, &all_created("p2")).await;
    let mut producer = RawProducer::connect(nats.client_port, None).await;
    assert!(delivered_again(&mut producer, &mut on_a, "p1", "before")
        .await
        .is_empty());
    assert!(delivered_again(&mut producer, &mut on_b, "p2", "before")
        .await
        .is_empty());
    // The reproduction: one PUB whose subject is not UTF-8.
    producer
        .publish(
            b"herald.ev.p1.prod.secret:created.apps.\xff\xfe.~",
            &payload("p1", "/apps/x"),
        )
        .await;
    producer.sync().await.unwrap();
    // Every later valid event is delivered on both instances. A lost its link
    // for a moment (the client refuses the bytes and reconnects): its stream
    // hears that it may have missed events.
    let controls = delivered_again(&mut producer, &mut on_a, "p1", "after").await;
    assert!(
        controls
            .iter()
            .any(|c| c.starts_with("gap:") && c.contains("bus_reconnected")),
        "{controls:?}"
    );
    assert!(delivered_again(&mut producer, &mut on_b, "p2", "after")
        .await
        .is_empty());
    assert!(
        a.metric("herald_nats_link_failures_total{reason=\"disconnected\"}")
            .await
            >= 1.0
    );
    // The same with a header that is not UTF-8.
    producer
        .publish_with_headers(
            &subject("p1", "h"),
            &[b"X-Bad: \xff\xfe"],
            &payload("p1", "/h"),
        )
        .await;
    producer.sync().await.unwrap();
    let controls = delivered_again(&mut producer, &mut on_a, "p1", "after-header").await;
    assert!(
        controls.iter().any(|c| c.starts_with("gap:")),
        "{controls:?}"
    );
    a.wait_ready(200).await;
    assert_eq!(a.metric("herald_nats_connected").await, 1.0);
}

#[tokio::test]
async fn hostile_subjects_and_payloads_are_dropped_and_counted() {
    // Room for what the server would otherwise refuse itself: 8 MiB payloads,
    // 16 KiB control lines (a 4 KB subject token).
    let nats = NatsServer::start_configured(
        "max_payload: 8388608\nmax_control_line: 16384\nmax_pending: 67108864\n",
        false,
    );
    let h = ready(on_nats(&nats)).await;
    let mut s = h
        .subscribe(&token_for("reader", HOUR), &all_created("p1"))
        .await;
    let mut producer = RawProducer::connect(nats.client_port, None).await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let big = format!(
        r#"{{"specversion":"1.0","source":"/s","type":"secret:created","projectid":"p1","environment":"prod","secretpath":"/big","data":{{"x":"{}"}}}}"#,
        "a".repeat(8 * 1024 * 1024 - 200)
    );
    let many_tokens = vec!["a"; 1000].join(".");
    let long_token = "b".repeat(4096);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("bad_subject", subject("p1", "a\0b"), payload("p1", "/a")),
        (
            "bad_subject",
            subject("p1", &many_tokens),
            payload("p1", "/a"),
        ),
        (
            "bad_subject",
            subject("p1", &long_token),
            payload("p1", "/a"),
        ),
        (
            "bad_subject",
            b"herald.ev.p1.prod".to_vec(),
            payload("p1", "/a"),
        ),
        (
            "malformed",
            subject("p1", "a"),
            b"\x00\x01\x02\xff".to_vec(),
        ),
        ("malformed", subject("p1", "a"), Vec::new()),
        ("malformed", subject("p1", "a"), b"[1,2,3]".to_vec()),
        ("malformed", subject("p1", "a"), deep.into_bytes()),
        ("too_large", subject("p1", "big"), big.into_bytes()),
        (
            "subject_mismatch",
            subject("p1", "a"),
            payload("p1", "/other"),
        ),
    ];
    for (i, (reason, subj, body)) in cases.into_iter().enumerate() {
        let before = h
            .metric(&format!(
                "herald_events_rejected_total{{reason=\"{reason}\"}}"
            ))
            .await;
        producer.publish(&subj, &body).await;
        let controls = delivered_again(&mut producer, &mut s, "p1", &format!("next{i}")).await;
        assert!(controls.is_empty(), "case {i}: {controls:?}");
        let after = h
            .metric(&format!(
                "herald_events_rejected_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert_eq!(after, before + 1.0, "case {i} counted as {reason}");
    }
    // Headers a producer may add: garbage values, a forged sequence (ignored
    // without replay).
    producer
        .publish_with_headers(
            &subject("p1", "h"),
            &[
                b"X-Junk: \x01\x02",
                b"Nats-Sequence: 18446744073709551615",
                b"Nats-Sequence: -1",
            ],
            &payload("p1", "/h"),
        )
        .await;
    delivered_again(&mut producer, &mut s, "p1", "after-headers").await;
    assert_eq!(
        h.metric("herald_nats_link_failures_total{reason=\"disconnected\"}")
            .await,
        0.0
    );
    h.wait_ready(200).await;
}

#[tokio::test]
async fn forged_sequences_on_the_republished_subjects_cannot_silence_a_project() {
    let nats = NatsServer::start_jetstream();
    let h = ready(on_nats(&nats).env("REPLAY__ENABLED", "true")).await;
    let mut s = h
        .subscribe(&token_for("reader", HOUR), &all_created("p1"))
        .await;
    let mut producer = RawProducer::connect(nats.client_port, None).await;
    let w = token_for("writer", HOUR);
    let first = h
        .publish(&w, &event("secret:created", "p1", "prod", "/one"))
        .await;
    let seq = first["events"][0]["sequence"].as_u64().unwrap();
    assert_eq!(s.next_event().await.id, Some(seq.to_string()));
    let rp = |tokens: &str| format!("herald.rp.p1.prod.secret:created.{tokens}.~").into_bytes();
    // No sequence, a sequence that is not a number, one that repeats, one
    // that goes back: dropped and counted.
    producer
        .publish(&rp("nohdr"), &payload("p1", "/nohdr"))
        .await;
    producer
        .publish_with_headers(&rp("bad"), &[b"Nats-Sequence: x1"], &payload("p1", "/bad"))
        .await;
    let same = format!("Nats-Sequence: {seq}");
    producer
        .publish_with_headers(&rp("again"), &[same.as_bytes()], &payload("p1", "/again"))
        .await;
    producer.sync().await.unwrap();
    let next = h
        .publish(&w, &event("secret:created", "p1", "prod", "/two"))
        .await;
    let ev = s.next_event().await;
    assert_eq!(ev.json()["secretpath"], "/two", "nothing forged came first");
    assert_eq!(
        ev.id,
        Some(next["events"][0]["sequence"].as_u64().unwrap().to_string())
    );
    for (reason, n) in [
        ("missing_sequence", 1.0),
        ("bad_sequence", 1.0),
        ("stale_sequence", 1.0),
    ] {
        assert_eq!(
            h.metric(&format!(
                "herald_events_rejected_total{{reason=\"{reason}\"}}"
            ))
            .await,
            n,
            "{reason}"
        );
    }
    // A forged huge sequence is believed (it moves forward), but it cannot
    // silence the project: real events behind it are delivered again after
    // the mark is found to be a forgery.
    producer
        .publish_with_headers(
            &rp("huge"),
            &[b"Nats-Sequence: 18446744073709551615"],
            &payload("p1", "/huge"),
        )
        .await;
    producer.sync().await.unwrap();
    assert_eq!(s.next_event().await.json()["secretpath"], "/huge");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let path = format!("/later{n}");
        h.publish(&w, &event("secret:created", "p1", "prod", &path))
            .await;
        if let Some(ev) = s.next_within(Duration::from_millis(500)).await {
            if !ev.is_meta() && ev.json()["secretpath"] == path.as_str() {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the project stayed silent"
        );
    }
}

#[tokio::test]
async fn forged_presence_cannot_lock_an_identity_out() {
    let nats = NatsServer::start_configured("max_payload: 8388608\n", false);
    let h = ready(on_nats(&nats)).await;
    let mut producer = RawProducer::connect(nats.client_port, None).await;
    let forged = |streams: Value, connections: u64| {
        json!({"id": "f0f0f0", "version": "9", "connections": connections,
               "policy_generation": 1, "policy_fingerprint": "x", "streams": streams})
        .to_string()
        .into_bytes()
    };
    let with_infisical = |streams: Value, connections: u64, infisical: Value| {
        json!({"id": "f0f0f1", "version": "9", "connections": connections,
               "policy_generation": 1, "policy_fingerprint": "x", "streams": streams,
               "infisical_streams": infisical})
        .to_string()
        .into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"{not json".to_vec()),
        ("oversized", vec![b' '; 4 * 1024 * 1024 + 1]),
        (
            "over_limit",
            forged(json!([["reader", "p1", 1_000_000_000u64]]), 1_000_000_000),
        ),
        ("over_limit", forged(json!([["reader", "p1", 5]]), 1)),
        ("bad_field", forged(json!([["role:admin", "p1", 1]]), 1)),
        ("bad_field", forged(json!([["reader", "p.1", 1]]), 1)),
        // Infisical-listener counts: within the project cap, never more
        // than the streams claimed, a valid project.
        (
            "over_limit",
            with_infisical(json!([["reader", "p1", 5]]), 5, json!([["p1", 101]])),
        ),
        (
            "over_limit",
            with_infisical(json!([["reader", "p1", 1]]), 1, json!([["p1", 2]])),
        ),
        (
            "bad_field",
            with_infisical(json!([["reader", "p1", 1]]), 1, json!([["p.1", 1]])),
        ),
    ];
    for (_, body) in &cases {
        producer.publish(b"herald.sys.presence", body).await;
    }
    producer.sync().await.unwrap();
    for reason in ["malformed", "oversized", "over_limit", "bad_field"] {
        let want = cases.iter().filter(|(r, _)| *r == reason).count() as f64;
        h.wait_metric(
            &format!("herald_presence_rejected_total{{reason=\"{reason}\"}}"),
            want,
        )
        .await;
    }
    // The identity the forgeries named can still open its streams.
    let t = token_for("reader", HOUR);
    let mut open = Vec::new();
    for _ in 0..5 {
        let r = h.subscribe_raw(Some(&t), &all_created("p1")).await;
        assert_eq!(r.status(), 200);
        open.push(r);
    }
    let (_, cluster) = h.admin_json("/admin/cluster").await;
    assert_eq!(
        cluster["instances"].as_array().unwrap().len(),
        1,
        "no forged peer believed"
    );
}

#[tokio::test]
async fn a_silent_link_is_noticed_within_seconds_and_streams_are_told() {
    let nats = NatsServer::start();
    let h = ready(on_nats(&nats).env("NATS__REQUEST_TIMEOUT", "1s")).await;
    let mut s = h
        .subscribe(&token_for("reader", HOUR), &all_created("p1"))
        .await;
    let mut producer = RawProducer::connect(nats.client_port, None).await;
    delivered_again(&mut producer, &mut s, "p1", "before").await;
    // The server stops where it stands: its socket stays open and says
    // nothing, which the client library alone would take 30 s to notice.
    nats.freeze();
    let frozen = tokio::time::Instant::now();
    h.wait_ready_within(503, Duration::from_secs(5)).await;
    let noticed = frozen.elapsed();
    assert_eq!(h.metric("herald_nats_connected").await, 0.0);
    let failures = h.metrics().await;
    assert!(
        failures.contains("herald_nats_link_failures_total{reason=\"round_trip\"} 1")
            || failures.contains("herald_nats_link_failures_total{reason=\"canary\"} 1"),
        "{failures}"
    );
    nats.resume();
    h.wait_ready_within(200, Duration::from_secs(10)).await;
    let controls = delivered_again(&mut producer, &mut s, "p1", "after").await;
    assert!(
        controls
            .iter()
            .any(|c| c.starts_with("gap:") && c.contains("bus_reconnected")),
        "{controls:?}"
    );
    eprintln!("a silent link was noticed after {noticed:?}");
}

/// docker/nats-server.conf, as shipped: herald works with its own user
/// (replay included), nobody gets in without one, and a producer publishes
/// its own projects' events and nothing else.
#[tokio::test]
async fn the_shipped_nats_permissions_let_a_producer_publish_only_its_events() {
    let conf = std::fs::read_to_string(repo_path("docker/nats-server.conf")).unwrap();
    let nats = NatsServer::start_configured_env(
        &conf,
        true,
        &[
            ("HERALD_NATS_PASSWORD", "herald-pw"),
            ("PRODUCER_P1_NATS_PASSWORD", "producer-pw"),
        ],
    );
    let h = ready(
        on_nats(&nats)
            .env("NATS__USER", "herald")
            .env("NATS__PASSWORD", "herald-pw")
            .env("REPLAY__ENABLED", "true"),
    )
    .await;
    let reader = token_for("reader", HOUR);
    let mut p1 = h.subscribe(&reader, &all_created("p1")).await;
    let mut p2 = h.subscribe(&reader, &all_created("p2")).await;

    let anonymous = RawProducer::try_connect(nats.client_port, None).await.err();
    assert!(
        anonymous
            .as_deref()
            .is_some_and(|e| e.contains("Authorization Violation")),
        "{anonymous:?}"
    );
    let wrong = RawProducer::try_connect(nats.client_port, Some(("producer-p1", "guess")))
        .await
        .err();
    assert!(wrong.is_some(), "a wrong password is refused");

    let mut producer =
        RawProducer::connect(nats.client_port, Some(("producer-p1", "producer-pw"))).await;
    producer
        .publish(&subject("p1", "first"), &payload("p1", "/first"))
        .await;
    producer.sync().await.unwrap();
    let first = p1.next_event().await;
    assert_eq!(first.json()["secretpath"], "/first");
    assert_eq!(first.id.as_deref(), Some("1"), "stored and republished");

    let presence = json!({"id": "forged", "version": 1, "connections": 1_000_000_000u64});
    // (what, subject, header lines, payload)
    type Attempt<'a> = (&'a str, Vec<u8>, Vec<&'a [u8]>, Vec<u8>);
    let forbidden: Vec<Attempt> = vec![
        (
            "another project",
            subject("p2", "x"),
            vec![],
            payload("p2", "/x"),
        ),
        (
            "presence",
            b"herald.sys.presence".to_vec(),
            vec![],
            presence.to_string().into_bytes(),
        ),
        (
            "a canary",
            b"herald.sys.canary.someone".to_vec(),
            vec![],
            b"x".to_vec(),
        ),
        (
            "a republished copy with a forged sequence",
            b"herald.rp.p1.prod.secret:created.x.~".to_vec(),
            vec![b"Nats-Sequence: 999999".as_slice()],
            payload("p1", "/x"),
        ),
        (
            "the JetStream API",
            b"$JS.API.STREAM.DELETE.HERALD_EVENTS".to_vec(),
            vec![],
            b"".to_vec(),
        ),
        (
            "a reply to herald",
            b"_INBOX_herald.anything".to_vec(),
            vec![],
            b"x".to_vec(),
        ),
    ];
    for (what, subj, headers, body) in forbidden {
        producer.publish_with_headers(&subj, &headers, &body).await;
        let r = producer.sync().await;
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("Permissions Violation for Publish")),
            "{what}: {r:?}"
        );
    }
    producer.subscribe("herald.ev.>", 1).await;
    let r = producer.sync().await;
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("Permissions Violation for Subscription")),
        "reading events: {r:?}"
    );

    // herald is unharmed: the next events are the next valid ones.
    producer
        .publish(&subject("p1", "second"), &payload("p1", "/second"))
        .await;
    producer.sync().await.unwrap();
    let second = p1.next_event().await;
    assert_eq!(second.json()["secretpath"], "/second");
    assert_eq!(second.id.as_deref(), Some("2"), "nothing forged was stored");
    let writer = token_for("writer", HOUR);
    h.publish(&writer, &event("secret:created", "p2", "prod", "/api"))
        .await;
    let on_p2 = p2.next_event().await;
    assert_eq!(on_p2.json()["secretpath"], "/api", "p2 got nothing forged");
    assert_eq!(h.metric("herald_nats_connected").await, 1.0);
    assert_eq!(h.metric("herald_cluster_instances").await, 1.0);
}

/// A producer's own headers are stored with its events, and a replay read
/// returns them before the server's: a forged `Nats-Sequence` or
/// `Nats-Subject` among them cannot stop, reorder or redirect a resume.
#[tokio::test]
async fn headers_stored_with_events_cannot_steer_a_resume() {
    let nats = NatsServer::start_jetstream();
    let h = ready(on_nats(&nats).env("REPLAY__ENABLED", "true")).await;
    let writer = token_for("writer", HOUR);
    let first = h
        .publish(&writer, &event("secret:created", "p1", "prod", "/first"))
        .await;
    let from = first["events"][0]["sequence"].as_u64().unwrap();
    let mut producer = RawProducer::connect(nats.client_port, None).await;
    let forged: [&[u8]; 3] = [
        b"Nats-Sequence: 999999999",
        b"Nats-Sequence: 1",
        b"Nats-Subject: herald.ev.p2.prod.secret:created.x.~",
    ];
    for (i, header) in forged.iter().enumerate() {
        let name = format!("forged{i}");
        producer
            .publish_with_headers(
                &subject("p1", &name),
                &[header],
                &payload("p1", &format!("/{name}")),
            )
            .await;
    }
    producer.sync().await.unwrap();
    h.publish(&writer, &event("secret:created", "p1", "prod", "/last"))
        .await;
    let r = h
        .http
        .post(h.url(SUBSCRIBE))
        .bearer_auth(token_for("reader", HOUR))
        .header("last-event-id", from.to_string())
        .json(&all_created("p1"))
        .send()
        .await
        .unwrap();
    let mut s = SseClient::open(r).await;
    let mut got = Vec::new();
    while got.len() < 4 {
        let ev = s.next_event().await;
        assert_eq!(ev.event.as_deref(), Some("secret:created"), "{ev:?}");
        got.push(
            ev.json()["secretpath"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert_eq!(got, ["/forged0", "/forged1", "/forged2", "/last"]);
}
