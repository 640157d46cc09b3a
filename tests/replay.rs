//! JetStream replay: SSE ids are stream sequences, the same on every instance;
//! a client resumes on any instance with Last-Event-ID and misses nothing it
//! may see, with no duplicate at the seam; publishes are acknowledged by
//! JetStream and deduplicated by event id.

mod common;

use std::time::Duration;

use common::nats::{urls_env, NatsServer};
use common::*;
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);

async fn replaying(nats: &NatsServer, extra: &[(&str, &str)]) -> Herald {
    let mut b = HeraldBuilder::new()
        .env("NATS__URLS", &urls_env(&[nats.url()]))
        .env("NATS__PRESENCE_INTERVAL", "200ms")
        .env("REPLAY__ENABLED", "true");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    let h = b.start();
    h.wait_ready(200).await;
    h
}

fn all_p1() -> Value {
    json!({"projectId": "p1", "register": [{"event": "secret:created"}]})
}

async fn resume(h: &Herald, last_id: &str) -> SseClient {
    let r = h
        .http
        .post(h.url(SUBSCRIBE))
        .bearer_auth(token_for("reader", HOUR))
        .header("last-event-id", last_id)
        .json(&all_p1())
        .send()
        .await
        .unwrap();
    SseClient::open(r).await
}

fn path_of(ev: &SseEvent) -> String {
    ev.json()["secretpath"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_client_resumes_on_another_instance_without_loss_or_duplicate() {
    let nats = NatsServer::start_jetstream();
    let a = replaying(&nats, &[]).await;
    let b = replaying(&nats, &[]).await;
    let w = token_for("writer", HOUR);
    let mut on_a = a.subscribe(&token_for("reader", HOUR), &all_p1()).await;
    let mut on_b = b.subscribe(&token_for("reader", HOUR), &all_p1()).await;
    let first = a
        .publish(&w, &event("secret:created", "p1", "prod", "/one"))
        .await;
    let seq1 = first["events"][0]["sequence"]
        .as_u64()
        .expect("JetStream sequence");
    let ev_a = on_a.next_event().await;
    let ev_b = on_b.next_event().await;
    assert_eq!(
        ev_a.id,
        Some(seq1.to_string()),
        "the SSE id is the stream sequence"
    );
    assert_eq!(ev_b.id, ev_a.id, "the same id on every instance");
    drop(on_a); // the client goes away after /one ...
    b.publish(&w, &event("secret:created", "p1", "prod", "/two"))
        .await;
    b.publish(&w, &event("secret:created", "p1", "prod", "/internal/k"))
        .await;
    b.publish(&w, &event("secret:created", "p2", "prod", "/other-project"))
        .await;
    // A producer publishing straight to NATS is captured by the stream too.
    let direct = async_nats::connect(nats.url()).await.unwrap();
    let ev = event("secret:created", "p1", "prod", "/three");
    direct
        .publish(
            "herald.ev.p1.prod.secret:created.three.~",
            ev.to_string().into(),
        )
        .await
        .unwrap();
    direct.flush().await.unwrap();
    // ... wait until b saw everything, then the client comes back through b.
    for want in ["/two", "/three"] {
        assert_eq!(path_of(&on_b.next_event().await), want);
    }
    let mut back = resume(&b, &seq1.to_string()).await;
    b.publish(&w, &event("secret:created", "p1", "prod", "/four"))
        .await;
    let mut got = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let ev = back.next_event().await;
        ids.push(ev.id.clone().unwrap().parse::<u64>().unwrap());
        got.push(path_of(&ev));
    }
    assert_eq!(
        got,
        vec!["/two", "/three", "/four"],
        "missed events in order, then live; /internal denied"
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(b.metric("herald_replayed_events_total").await >= 2.0);
}

#[tokio::test]
async fn publishes_are_stored_once_per_event_id() {
    let nats = NatsServer::start_jetstream();
    let h = replaying(&nats, &[]).await;
    let mut s = h.subscribe(&token_for("reader", HOUR), &all_p1()).await;
    let w = token_for("writer", HOUR);
    let mut e = event("secret:created", "p1", "prod", "/dup");
    e["id"] = json!("evt-123");
    let first = h.publish(&w, &e).await;
    let again = h.publish(&w, &e).await;
    assert_eq!(
        first["events"][0]["sequence"], again["events"][0]["sequence"],
        "a retried publish is stored once"
    );
    h.publish(&w, &event("secret:created", "p1", "prod", "/next"))
        .await;
    assert_eq!(path_of(&s.next_event().await), "/dup");
    assert_eq!(path_of(&s.next_event().await), "/next", "delivered once");
}

#[tokio::test]
async fn resumes_that_cannot_be_served_whole_get_gap() {
    let nats = NatsServer::start_jetstream();
    let h = replaying(&nats, &[("REPLAY__MAX_EVENTS", "2")]).await;
    let w = token_for("writer", HOUR);
    let first = h
        .publish(&w, &event("secret:created", "p1", "prod", "/0"))
        .await;
    let seq0 = first["events"][0]["sequence"].as_u64().unwrap();
    for i in 1..=5 {
        h.publish(&w, &event("secret:created", "p1", "prod", &format!("/{i}")))
            .await;
    }
    // Five missed, two replayed, then gap.
    let mut s = resume(&h, &seq0.to_string()).await;
    assert_eq!(path_of(&s.next_event().await), "/1");
    assert_eq!(path_of(&s.next_event().await), "/2");
    let gap = s.next_event().await;
    assert_eq!(gap.event.as_deref(), Some("gap"));
    assert_eq!(gap.json()["reason"], "too_far_behind");
    // An id the stream never issued.
    let mut s = resume(&h, "999999").await;
    let gap = s.next_event().await;
    assert_eq!(
        (gap.event.as_deref(), gap.json()["reason"].as_str()),
        (Some("gap"), Some("unknown_id"))
    );
}

#[tokio::test]
async fn a_long_resume_replays_everything() {
    let nats = NatsServer::start_jetstream();
    let h = replaying(&nats, &[]).await;
    let w = token_for("writer", HOUR);
    let first = h
        .publish(&w, &event("secret:created", "p1", "prod", "/0"))
        .await;
    let seq0 = first["events"][0]["sequence"].as_u64().unwrap();
    for chunk in 0..30 {
        let batch: Vec<Value> = (0..10)
            .map(|i| {
                event(
                    "secret:created",
                    "p1",
                    "prod",
                    &format!("/{}", chunk * 10 + i + 1),
                )
            })
            .collect();
        h.publish(&w, &json!(batch)).await;
        // Another project's events in between: not this stream's.
        h.publish(&w, &event("secret:created", "p2", "prod", "/other"))
            .await;
    }
    // More than one Direct Get batch (256).
    let mut s = resume(&h, &seq0.to_string()).await;
    for i in 1..=300 {
        assert_eq!(path_of(&s.next_event().await), format!("/{i}"));
    }
    assert_eq!(
        h.metric("herald_replay_reads_total{method=\"direct\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn after_a_nats_outage_clients_resume_without_loss() {
    use common::eventsource::EventSource;
    let mut nats = NatsServer::start_jetstream();
    let h = replaying(&nats, &[("STREAM__RETRY", "200ms")]).await;
    let client = EventSource::start(h.url(SUBSCRIBE), token_for("reader", HOUR), all_p1());
    assert!(client.wait_opened(1, WAIT).await);
    let w = token_for("writer", HOUR);
    let mut acked = Vec::new();
    for i in 0..5 {
        let v = h
            .publish(
                &w,
                &event("secret:created", "p1", "prod", &format!("/before/{i}")),
            )
            .await;
        acked.push(v["events"][0]["sequence"].as_u64().unwrap());
    }
    assert!(client.wait_for(5, WAIT).await);
    nats.kill();
    h.wait_ready(503).await;
    let refused = h
        .publish_raw(&w, &event("secret:created", "p1", "prod", "/during"))
        .await;
    assert_eq!(refused.status(), 503, "not stored, so not promised");
    nats.restart();
    h.wait_ready(200).await;
    for i in 0..5 {
        let v = h
            .publish(
                &w,
                &event("secret:created", "p1", "prod", &format!("/after/{i}")),
            )
            .await;
        acked.push(v["events"][0]["sequence"].as_u64().unwrap());
    }
    assert!(
        client.wait_for(10, WAIT).await,
        "the client caught up after the outage"
    );
    let seen = client.stop().await;
    let ids: Vec<u64> = seen.events.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, acked, "every acknowledged event once, in order");
    assert_eq!(seen.connects, 1, "the stream resumed in place");
    assert!(seen.controls.is_empty(), "{:?}", seen.controls);
}

/// The instance's own link is cut while another instance goes on storing
/// events: when the link is back, the instance's streams get what they
/// missed, in order, on the connection they have (no `reconnect`, no `gap`,
/// no duplicate).
#[tokio::test]
async fn an_instance_whose_link_was_cut_resumes_its_streams_in_place() {
    use common::eventsource::EventSource;
    use common::nats::CutLink;
    let nats = NatsServer::start_jetstream();
    let link = CutLink::start(nats.client_port).await;
    let a = HeraldBuilder::new()
        .env("NATS__URLS", &urls_env(&[link.url()]))
        .env("NATS__PRESENCE_INTERVAL", "200ms")
        .env("NATS__LIVENESS_INTERVAL", "200ms")
        .env("NATS__LIVENESS_TIMEOUT", "1s")
        .env("REPLAY__ENABLED", "true")
        .start();
    a.wait_ready(200).await;
    let b = replaying(&nats, &[]).await;
    let client = EventSource::start(a.url(SUBSCRIBE), token_for("reader", HOUR), all_p1());
    assert!(client.wait_opened(1, WAIT).await);
    // A steady publisher on the other instance, across the cut and the
    // restore: what arrives live right after the link is back must not
    // overtake what was missed.
    let w = token_for("writer", HOUR);
    let acked = std::sync::Mutex::new(Vec::new());
    let (done_tx, mut done) = tokio::sync::watch::channel(false);
    let publisher = async {
        let mut i = 0;
        while !*done.borrow_and_update() {
            let v = b
                .publish(
                    &w,
                    &event("secret:created", "p1", "prod", &format!("/e/{i}")),
                )
                .await;
            acked
                .lock()
                .unwrap()
                .push(v["events"][0]["sequence"].as_u64().unwrap());
            i += 1;
            let _ = tokio::time::timeout(Duration::from_millis(20), done.changed()).await;
        }
    };
    let count = || acked.lock().unwrap().len();
    let until = |n: usize| async move {
        eventually(WAIT, "the publisher is stuck", || async {
            (count() >= n).then_some(())
        })
        .await
    };
    let control = async {
        until(3).await;
        assert!(client.wait_for(3, WAIT).await);
        link.cut();
        a.wait_ready(503).await;
        let at_cut = count();
        until(at_cut + 5).await;
        link.restore();
        a.wait_ready(200).await;
        let at_restore = count();
        until(at_restore + 5).await;
        done_tx.send_replace(true);
    };
    tokio::join!(publisher, control);
    let acked = acked.into_inner().unwrap();
    assert!(
        client.wait_for(acked.len(), WAIT).await,
        "the client got what it missed"
    );
    let seen = client.stop().await;
    let ids: Vec<u64> = seen.events.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, acked, "every event once, in order");
    assert_eq!(seen.connects, 1, "on the same connection");
    assert!(seen.controls.is_empty(), "{:?}", seen.controls);
    assert!(a.metric("herald_replayed_events_total").await >= 5.0);
    assert_eq!(
        a.metric("herald_streams_closed_total{reason=\"reconnect\"}")
            .await,
        0.0
    );
}

/// The control event a resume from `last_id` starts with, its id numbers
/// replaced by `N` (each bus numbers events its own way).
async fn resume_gap(h: &Herald, last_id: u64) -> (Option<String>, String) {
    let mut s = resume(h, &last_id.to_string()).await;
    let ev = s.next_event().await;
    (ev.event.clone(), ev.data.replace(&last_id.to_string(), "N"))
}

#[tokio::test]
async fn resume_control_events_are_the_same_on_both_buses() {
    // The embedded ring and JetStream, each retaining the last 3 events.
    let embedded = HeraldBuilder::new()
        .env("STREAM__REPLAY_BUFFER", "3")
        .start();
    let nats = NatsServer::start_jetstream();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "HERALD_EVENTS".into(),
        subjects: vec!["herald.ev.>".into()],
        max_messages: 3,
        republish: Some(async_nats::jetstream::stream::Republish {
            source: "herald.ev.>".into(),
            destination: "herald.rp.>".into(),
            headers_only: false,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let on_nats = replaying(&nats, &[]).await;
    let w = token_for("writer", HOUR);
    let mut firsts = Vec::new();
    for h in [&embedded, &on_nats] {
        let mut seqs = Vec::new();
        for i in 0..5 {
            let v = h
                .publish(&w, &event("secret:created", "p1", "prod", &format!("/{i}")))
                .await;
            seqs.push(v["events"][0]["sequence"].as_u64().unwrap());
        }
        firsts.push(seqs);
    }
    let mut seen = Vec::new();
    for (h, seqs) in [&embedded, &on_nats].into_iter().zip(&firsts) {
        let expired = resume_gap(h, seqs[0]).await;
        let unknown = resume_gap(h, seqs[4] + 1000).await;
        seen.push((expired, unknown));
    }
    assert_eq!(seen[0], seen[1], "the same bytes on both buses");
    let (expired, unknown) = &seen[0];
    assert_eq!(expired.0.as_deref(), Some("gap"));
    let v: Value = serde_json::from_str(&expired.1).unwrap();
    assert_eq!(v["reason"], "expired");
    assert_eq!(v["lastEventId"], "N", "the gap names the id resumed from");
    let v: Value = serde_json::from_str(&unknown.1).unwrap();
    assert_eq!(v["reason"], "unknown_id");
    assert_eq!(v["lastEventId"], "N");
}

/// Thirty clients resume at once on an instance that reads one replay at a
/// time: every stream opens at once, each gets what it missed, in order,
/// with nothing else (no `reconnect` for a client that only had to wait),
/// and no consumer outlives its read.
#[tokio::test]
async fn resumes_wait_their_turn_and_leave_no_consumer_behind() {
    resumes_in_turn("consumer").await;
}

/// The same with Direct Get reads (the default): no consumer at all.
#[tokio::test]
async fn resumes_read_with_direct_gets_need_no_consumer() {
    resumes_in_turn("direct").await;
}

async fn resumes_in_turn(method: &str) {
    let nats = NatsServer::start_jetstream();
    let h = replaying(
        &nats,
        &[
            ("REPLAY__READ_METHOD", method),
            ("REPLAY__MAX_CONCURRENT_READS", "1"),
            ("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "30"),
            ("LIMITS__SUBSCRIBE_BURST", "30"),
        ],
    )
    .await;
    let w = token_for("writer", HOUR);
    let mut seqs = Vec::new();
    for i in 0..10 {
        let v = h
            .publish(&w, &event("secret:created", "p1", "prod", &format!("/{i}")))
            .await;
        seqs.push(v["events"][0]["sequence"].as_u64().unwrap());
    }
    let from = seqs[0].to_string();
    let opened = futures_util::future::join_all((0..30).map(|_| resume(&h, &from))).await;
    let want: Vec<String> = (1..10).map(|i| format!("/{i}")).collect();
    for mut s in opened {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let ev = s.next_event().await;
            assert_eq!(ev.event.as_deref(), Some("secret:created"), "{ev:?}");
            got.push(path_of(&ev));
        }
        assert_eq!(got, want);
    }
    let reads = |m: &str| format!("herald_replay_reads_total{{method=\"{m}\"}}");
    assert_eq!(h.metric(&reads(method)).await, 30.0);
    let other = if method == "direct" {
        "consumer"
    } else {
        "direct"
    };
    assert_eq!(h.metric(&reads(other)).await, 0.0);
    assert_eq!(h.metric("herald_replays_waiting").await, 0.0);
    eventually(
        Duration::from_secs(5),
        "replay consumers were left on the server",
        || async {
            let v = nats.monitor("/jsz?streams=true").await;
            let count =
                v["account_details"][0]["stream_detail"][0]["state"]["consumer_count"].as_u64()?;
            (count == 0).then_some(())
        },
    )
    .await;
}
