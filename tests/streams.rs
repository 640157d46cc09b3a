//! Stream lifecycle against the real binary: resume and gap, slow consumers,
//! token expiry, heartbeats, connection limits, and the SIGTERM drain.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOUR: Duration = Duration::from_secs(3600);

fn all_created(project: &str) -> Value {
    registration(project, "secret:created", None, None)
}

async fn publish_paths(h: &Herald, paths: &[&str]) -> Vec<u64> {
    let w = token_for("writer", HOUR);
    let mut seqs = Vec::new();
    for p in paths {
        let v = h
            .publish(&w, &event("secret:created", "p1", "prod", p))
            .await;
        seqs.push(v["events"][0]["sequence"].as_u64().unwrap());
    }
    seqs
}

async fn subscribe_resuming(h: &Herald, last_id: &str, body: &Value) -> SseClient {
    let token = token_for("reader", HOUR);
    let r = h
        .subscribe_with(Some(&token), body, &[("last-event-id", last_id)])
        .await;
    SseClient::open(r).await
}

transport_tests! {
async fn last_event_id_resumes_without_loss_or_duplicate(t: Transport) {
    let h = HeraldBuilder::new().transport(t)
        .env("STREAM__REPLAY_BUFFER", "100")
        .start();
    let mut s = h
        .subscribe(&token_for("reader", HOUR), &all_created("p1"))
        .await;
    let seqs = publish_paths(&h, &["/a", "/b"]).await;
    assert_eq!(s.next_event().await.id, Some(seqs[0].to_string()));
    drop(s); // the client goes away after /a ...
    let later = publish_paths(&h, &["/c", "/internal/x", "/d"]).await;
    // ... and comes back with the id of the last event it saw.
    let mut s = subscribe_resuming(&h, &seqs[0].to_string(), &all_created("p1")).await;
    let live = publish_paths(&h, &["/e"]).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let ev = s.next_event().await;
        got.push((
            ev.id.clone().unwrap(),
            ev.json()["secretpath"].as_str().unwrap().to_owned(),
        ));
    }
    let want = vec![
        (seqs[1].to_string(), "/b".to_owned()),
        (later[0].to_string(), "/c".to_owned()),
        (later[2].to_string(), "/d".to_owned()), // /internal/x is denied to reader, also on replay
        (live[0].to_string(), "/e".to_owned()),
    ];
    assert_eq!(got, want);
    assert_eq!(h.metric("herald_replayed_events_total").await, 3.0);
    // The GET form takes the id from the query, like a first EventSource connect.
    let url = format!(
        "{SUBSCRIBE}?projectId=p1&event=secret:created&lastEventId={}&access_token={}",
        later[2],
        token_for("reader", HOUR)
    );
    let mut g = SseClient::open(h.get_stream(&url).await).await;
    assert_eq!(g.next_event().await.json()["secretpath"], "/e");
}
}

transport_tests! {
async fn resume_older_than_the_buffer_gets_gap(t: Transport) {
    let h = HeraldBuilder::new().transport(t)
        .env("STREAM__REPLAY_BUFFER", "3")
        .start();
    let seqs = publish_paths(&h, &["/1", "/2", "/3", "/4", "/5"]).await;
    let mut s = subscribe_resuming(&h, &seqs[0].to_string(), &all_created("p1")).await;
    let gap = s.next_event().await;
    assert_eq!(gap.event.as_deref(), Some("gap"));
    assert_eq!(
        gap.id, None,
        "control events carry no id, so the client's last id stays put"
    );
    assert_eq!(gap.json()["reason"], "expired");
    // What is still retained follows the gap.
    for want in ["/3", "/4", "/5"] {
        assert_eq!(s.next_event().await.json()["secretpath"], want);
    }
    // An id this instance never issued is a gap too, and so is garbage.
    for bad in ["99999999999999999", "not-a-number"] {
        let mut s = subscribe_resuming(&h, bad, &all_created("p1")).await;
        assert_eq!(s.next_event().await.event.as_deref(), Some("gap"), "{bad}");
    }
}
}

/// Opens a stream on a raw socket that sends its request and then does not read.
async fn stalled_subscriber(h: &Herald, token: &str) -> tokio::net::TcpStream {
    stalled_subscriber_after(h, token, b"").await
}

/// [`stalled_subscriber`], after `first` (another request, read whole, so
/// that the stream is hyper's).
async fn stalled_subscriber_after(h: &Herald, token: &str, first: &[u8]) -> tokio::net::TcpStream {
    let body = all_created("p1").to_string();
    let mut s = tokio::net::TcpStream::connect(h.public).await.unwrap();
    if !first.is_empty() {
        s.write_all(first).await.unwrap();
        let (found, _) = read_until(&mut s, "not_found").await;
        assert!(found, "the first request was answered");
    }
    let req = format!(
        "POST {SUBSCRIBE} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Publishes `n` events of 48 KiB: enough to fill the socket buffers of a
/// client that does not read, and then its queue.
async fn flood(h: &Herald, n: usize) {
    flood_paced(h, n, None).await
}

/// [`flood`], publishing each event only once `pace` grants a permit: a
/// reader that adds one permit per event read is never more than the
/// initial permits behind, however loaded the machine is.
async fn flood_paced(h: &Herald, n: usize, pace: Option<&tokio::sync::Semaphore>) {
    let w = token_for("writer", HOUR);
    for i in 0..n {
        if let Some(pace) = pace {
            pace.acquire().await.unwrap().forget();
        }
        let mut e = event("secret:created", "p1", "prod", &format!("/e{i}"));
        e["data"] = json!({"blob": "z".repeat(48 * 1024)});
        h.publish(&w, &e).await;
    }
}

/// Reads from `s` until `needle` shows up or the connection ends.
async fn read_until(s: &mut tokio::net::TcpStream, needle: &str) -> (bool, String) {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("neither {needle:?} nor the end of the connection arrived"),
            Ok(Ok(0)) | Ok(Err(_)) => return (false, String::from_utf8_lossy(&all).into_owned()),
            Ok(Ok(n)) => {
                all.extend_from_slice(&buf[..n]);
                let tail =
                    String::from_utf8_lossy(&all[all.len().saturating_sub(n + needle.len())..])
                        .into_owned();
                if tail.contains(needle) {
                    return (true, String::from_utf8_lossy(&all).into_owned());
                }
            }
        }
    }
}

transport_tests! {
async fn slow_consumer_is_closed_while_others_keep_receiving(t: Transport) {
    let h = HeraldBuilder::new().transport(t)
        .env("STREAM__QUEUE_FRAMES", "8")
        .env("STREAM__CLOSE_TIMEOUT", "60s")
        .start();
    let t = token_for("reader", HOUR);
    let mut slow = stalled_subscriber(&h, &t).await;
    let mut fast = h.subscribe(&t, &all_created("p1")).await;
    h.wait_metric("herald_connections", 2.0).await;
    let n = 400;
    // The fast client keeps up by construction: the flood is never more than
    // four events ahead of it (its queue holds eight).
    let pace = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    let reader = tokio::spawn({
        let pace = pace.clone();
        async move {
            let mut paths = Vec::new();
            for _ in 0..n {
                let e = fast.next_event().await;
                match e.json()["secretpath"].as_str() {
                    Some(path) => paths.push(path.to_owned()),
                    None => {
                        // Let the flood finish; the assertion shows what came.
                        paths.push(format!("{:?} {}", e.event, e.data));
                        pace.add_permits(n);
                        break;
                    }
                }
                pace.add_permits(1);
            }
            paths
        }
    });
    flood_paced(&h, n, Some(&pace)).await;
    let paths = reader.await.unwrap();
    let want: Vec<String> = (0..n).map(|i| format!("/e{i}")).collect();
    assert_eq!(paths, want, "the fast client got every event, in order");
    h.wait_metric("herald_streams_closed_total{reason=\"slow_consumer\"}", 1.0)
        .await;
    assert!(
        h.metric("herald_events_dropped_total{reason=\"slow_consumer\"}")
            .await
            >= 1.0
    );
    // The slow client, reading at last, finds the slow_consumer error after what was buffered.
    let (found, _) = read_until(&mut slow, "event: error\ndata: {\"code\":\"slow_consumer\"").await;
    assert!(found, "the slow stream ended with error slow_consumer");
    h.wait_metric("herald_connections", 0.0).await;
}
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected() {
    for first in [&b""[..], b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n"] {
        never_reading(first).await;
    }
}

/// A stream whose client never reads, on the direct writer (nothing before
/// it) or on hyper's (`first` before it).
async fn never_reading(first: &[u8]) {
    let h = HeraldBuilder::new()
        .env("STREAM__QUEUE_FRAMES", "4")
        .env("STREAM__CLOSE_TIMEOUT", "200ms")
        .start();
    let mut stuck = stalled_subscriber_after(&h, &token_for("reader", HOUR), first).await;
    h.wait_metric("herald_connections", 1.0).await;
    flood(&h, 300).await;
    h.wait_metric("herald_streams_closed_total{reason=\"slow_consumer\"}", 1.0)
        .await;
    // Its socket is dropped without waiting for it to read: memory is released.
    h.wait_metric("herald_connections", 0.0).await;
    let (found, _) = read_until(&mut stuck, "never-present").await;
    assert!(!found);
}

transport_tests! {
async fn stream_ends_when_the_token_expires(t: Transport) {
    let h = HeraldBuilder::new().transport(t).start();
    let short = token_for("reader", Duration::from_secs(2));
    let mut s = h.subscribe(&short, &all_created("p1")).await;
    let seen = s.until_end().await;
    let last = seen.last().expect("an error event before the end");
    assert_eq!(last.event.as_deref(), Some("error"));
    assert_eq!(last.json()["code"], "token_expired");
    assert_eq!(
        h.metric("herald_streams_closed_total{reason=\"token_expired\"}")
            .await,
        1.0
    );
}
}

#[tokio::test]
async fn streams_are_told_to_reconnect_at_their_lifetime() {
    let h = HeraldBuilder::new()
        .env("STREAM__MAX_LIFETIME", "1s")
        .env("STREAM__REPLAY_BUFFER", "100")
        .start();
    let token = token_for("reader", HOUR);
    let mut s = h.subscribe(&token, &all_created("p1")).await;
    let first = publish_paths(&h, &["/a"]).await;
    let seen = s.until_end().await;
    let events: Vec<_> = seen.iter().filter(|e| !e.is_meta()).collect();
    assert_eq!(events[0].id, Some(first[0].to_string()));
    let last = events.last().expect("a reconnect before the end");
    assert_eq!(last.event.as_deref(), Some("reconnect"));
    assert_eq!(last.json()["reason"], "max_lifetime");
    assert!(last.retry.is_some(), "a reconnect carries its retry: hint");
    assert_eq!(
        h.metric("herald_streams_closed_total{reason=\"reconnect\"}")
            .await,
        1.0
    );
    // The client comes back where it left off and misses nothing.
    let missed = publish_paths(&h, &["/b"]).await;
    let mut s = subscribe_resuming(&h, &first[0].to_string(), &all_created("p1")).await;
    assert_eq!(s.next_event().await.id, Some(missed[0].to_string()));
}

transport_tests! {
async fn idle_streams_get_heartbeats(t: Transport) {
    let h = HeraldBuilder::new().transport(t)
        .env("STREAM__HEARTBEAT", "200ms")
        .start();
    let mut s = h
        .subscribe(&token_for("reader", HOUR), &all_created("p1"))
        .await;
    let mut comments = 0;
    while comments < 2 {
        let ev = s.next_raw(WAIT).await.expect("stream open");
        if ev.comment {
            comments += 1;
        }
    }
}
}

transport_tests! {
async fn sixth_stream_of_an_identity_gets_429(t: Transport) {
    let h = HeraldBuilder::new().transport(t).start();
    let t = token_for("reader", HOUR);
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(h.subscribe(&t, &all_created("p1")).await);
    }
    let r = h.subscribe_raw(Some(&t), &all_created("p1")).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["error"]["details"]["limit"],
        "connections_per_identity_project"
    );
    // Another project, or another identity, is a separate budget.
    let _other = h.subscribe(&t, &all_created("p2")).await;
    let _other_id = h
        .subscribe(&token_for("dev-subscriber", HOUR), &all_created("p1"))
        .await;
    // Closing one frees its slot.
    drop(open.pop());
    h.wait_metric("herald_connections", 6.0).await;
    let _again = h.subscribe(&t, &all_created("p1")).await;
    assert!(
        h.metric("herald_limit_rejections_total{limit=\"connections_per_identity_project\"}")
            .await
            >= 1.0
    );
}
}

transport_tests! {
async fn one_identity_cannot_take_every_slot_across_projects(t: Transport) {
    // 5 streams on each of 9 made-up projects would have taken all 40 slots.
    let h = HeraldBuilder::new().transport(t)
        .env("LIMITS__MAX_CONNECTIONS", "40")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY", "12")
        .env("LIMITS__SUBSCRIBE_BURST", "100")
        .start();
    let t = token_for("reader", HOUR);
    let mut open = Vec::new();
    let mut refused = None;
    'projects: for p in 0..9 {
        for _ in 0..5 {
            let r = h
                .subscribe_raw(Some(&t), &all_created(&format!("made-up-{p}")))
                .await;
            if r.status() != 200 {
                refused = Some((r.status(), r.json::<Value>().await.unwrap()));
                break 'projects;
            }
            open.push(SseClient::open(r).await);
        }
    }
    assert_eq!(open.len(), 12);
    let (status, v) = refused.expect("the 13th stream is refused");
    assert_eq!(status, 429);
    assert_eq!(v["error"]["details"]["limit"], "connections_per_identity");
    assert_eq!(
        h.metric("herald_limit_rejections_total{limit=\"connections_per_identity\"}")
            .await,
        1.0
    );
    // Everyone else is still served.
    let _other = h
        .subscribe(&token_for("dev-subscriber", HOUR), &all_created("p1"))
        .await;
}
}

#[tokio::test]
async fn streams_cannot_take_the_descriptors_the_api_needs() {
    // A low open-file limit: streams get what is left after the reserve, and
    // the publish API and the admin listener are still served when they have
    // taken it all.
    let h = HeraldBuilder::new()
        .open_files(160)
        .env("LIMITS__RESERVED_FDS", "64")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "1000")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY", "1000")
        .env("LIMITS__SUBSCRIBE_BURST", "1000")
        .start();
    assert!(
        h.log().contains("streams=96"),
        "the stream cap is the limit minus the reserve:\n{}",
        h.log()
    );
    let t = token_for("reader", HOUR);
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..110 {
        let r = reqwest::Client::new()
            .post(h.url(SUBSCRIBE))
            .bearer_auth(&t)
            .json(&all_created("p1"))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            open.push(SseClient::open(r).await);
        } else {
            assert_eq!(r.status(), 429);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["details"]["limit"], "max_connections");
            refused += 1;
        }
    }
    assert_eq!(open.len(), 96);
    assert_eq!(refused, 14);
    let (status, _) = h.admin_json("/healthz").await;
    assert_eq!(status, 200);
    let published = h
        .publish(
            &token_for("writer", HOUR),
            &event("secret:created", "p1", "prod", "/a"),
        )
        .await;
    assert_eq!(published["ids"].as_array().unwrap().len(), 1);
    assert_eq!(open[95].next_event().await.json()["secretpath"], "/a");
}

transport_tests! {
async fn a_resume_replays_only_its_own_project(t: Transport) {
    let h = HeraldBuilder::new().transport(t)
        .env("STREAM__REPLAY_BUFFER", "100")
        .start();
    let w = token_for("writer", HOUR);
    let first = h
        .publish(&w, &event("secret:created", "p1", "prod", "/start"))
        .await;
    let from = first["events"][0]["sequence"].as_u64().unwrap();
    for (project, path) in [("p2", "/x"), ("p1", "/mine"), ("p9", "/y"), ("p2", "/z")] {
        h.publish(&w, &event("secret:created", project, "prod", path))
            .await;
    }
    h.publish(&w, &event("secret:created", "p1", "prod", "/end"))
        .await;
    let mut s = subscribe_resuming(&h, &from.to_string(), &all_created("p1")).await;
    assert_eq!(s.paths_until("/end").await, vec!["/mine".to_owned()]);
    assert_eq!(h.metric("herald_replayed_events_total").await, 2.0);
}
}

#[tokio::test]
async fn subscribe_rate_is_limited_per_identity() {
    let h = HeraldBuilder::new()
        .env("LIMITS__SUBSCRIBE_RATE", "0.01")
        .env("LIMITS__SUBSCRIBE_BURST", "3")
        .start();
    let t = token_for("reader", HOUR);
    let bad = json!({"projectId": "p1", "register": []});
    for _ in 0..3 {
        assert_eq!(h.subscribe_raw(Some(&t), &bad).await.status(), 400);
    }
    let r = h.subscribe_raw(Some(&t), &bad).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["details"]["limit"], "subscribe_rate");
    assert_eq!(
        h.subscribe_raw(Some(&token_for("other", HOUR)), &bad)
            .await
            .status(),
        400
    );
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_header_timeout() {
    let h = HeraldBuilder::new()
        .env("SERVER__HEADER_READ_TIMEOUT", "300ms")
        .start();
    // Nothing at all (the HTTP/1-or-2 detection read), then half a request head.
    for prefix in [
        &b""[..],
        b"GET /api/v1/events/subscribe/project-events HTTP/1.1\r\nhost: x\r\n",
    ] {
        let mut c = tokio::net::TcpStream::connect(h.public).await.unwrap();
        c.write_all(prefix).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(WAIT, c.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "herald closed the connection");
    }
}

transport_tests! {
async fn sigterm_drains_streams_and_exits(t: Transport) {
    let mut h = HeraldBuilder::new().transport(t)
        // Long enough for the readiness probe below to land inside it on a
        // loaded machine.
        .env("SHUTDOWN__GRACE", "1500ms")
        .env("SHUTDOWN__DRAIN_WINDOW", "300ms")
        .env("SHUTDOWN__DEADLINE", "5s")
        .start();
    let t = token_for("reader", HOUR);
    let mut streams = Vec::new();
    for p in ["p1", "p2", "p3"] {
        streams.push(h.subscribe(&t, &all_created(p)).await);
    }
    h.terminate();
    // Readiness fails at once, while streams are still open (the grace period).
    let v = eventually(WAIT, "/readyz never failed", || async {
        let (status, v) = h.admin_json("/readyz").await;
        (status == 503).then_some(v)
    })
    .await;
    assert_eq!(v["checks"]["draining"], true);
    // A new subscribe is answered 200 with an immediate reconnect.
    let r = h.subscribe_raw(Some(&t), &all_created("p1")).await;
    let mut late = SseClient::open(r).await;
    let ev = late.next_event().await;
    assert_eq!(ev.event.as_deref(), Some("reconnect"));
    assert!(ev.retry.is_some());
    // Every open stream is told to reconnect, with a retry hint, then closed.
    for s in &mut streams {
        let seen = s.until_end().await;
        let last = seen.last().expect("a reconnect before the end");
        assert_eq!(last.event.as_deref(), Some("reconnect"));
        let retry = last.retry.expect("jittered retry");
        assert!(
            (1500..=4500).contains(&retry),
            "retry {retry} within 0.5..1.5 x 3s"
        );
    }
    let status = h.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "clean exit: {status:?}");
}
}
