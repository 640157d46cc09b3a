//! Zero-loss scenarios on the full topology, without Docker: a 3-node NATS
//! cluster with JetStream (an R3 replay stream), three herald processes,
//! haproxy on loopback configured from docker/haproxy.cfg, and clients that
//! connect only through haproxy and reconnect with Last-Event-ID like a
//! browser's EventSource. Each scenario asserts that every published event
//! reached every client exactly once after dedupe by id, in order.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::eventsource::{EventSource, Seen};
use common::topology::Topology;
use common::*;
use parking_lot::Mutex;
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);

/// One topology at a time: each is seven processes plus hundreds of clients,
/// and two at once on a 2-core machine would measure the machine, not herald.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// How long clients may take to catch up after the last publish.
const CATCH_UP: Duration = Duration::from_secs(60);

fn body() -> Value {
    json!({"projectId": "p1", "register": [{"event": "secret:updated"}]})
}

/// Publishes `count` events through the load balancer from `publishers`
/// concurrent publishers, in batches; retries a refused or failed request with
/// the same event ids (JetStream stores each id once). Returns the sequences.
async fn publish_all(
    lb_url: String,
    count: usize,
    publishers: usize,
    batch: usize,
    pace: Duration,
) -> Vec<u64> {
    let seqs = Arc::new(Mutex::new(Vec::new()));
    let per = count / publishers;
    // Ids unique to this call: a retried request reuses them, another call never does.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (url, seqs, run) = (lb_url.clone(), seqs.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let w = token_for("writer", HOUR);
            let mut i = 0;
            while i < per {
                let n = batch.min(per - i);
                let events: Vec<Value> = (i..i + n)
                    .map(|k| {
                        let mut e = event("secret:updated", "p1", "prod", &format!("/p{p}/e{k}"));
                        e["id"] = json!(format!("{run}-p{p}-e{k}"));
                        e
                    })
                    .collect();
                let stored: Value = eventually(
                    Duration::from_secs(30),
                    "publishing never recovered",
                    || async {
                        let r = http
                            .post(&url)
                            .bearer_auth(&w)
                            .json(&events)
                            .send()
                            .await
                            .ok()?;
                        if r.status() != 202 {
                            return None;
                        }
                        r.json().await.ok()
                    },
                )
                .await;
                seqs.lock().extend(
                    stored["events"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["sequence"].as_u64().unwrap()),
                );
                i += n;
                tokio::time::sleep(pace).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut v = std::mem::take(&mut *seqs.lock());
    v.sort_unstable();
    v.dedup();
    v
}

/// Every client got every published sequence once after dedupe, in order.
/// Returns the duplicates delivered before dedupe.
async fn assert_complete(clients: Vec<EventSource>, published: &[u64]) -> (usize, Vec<Seen>) {
    for (i, c) in clients.iter().enumerate() {
        let ok = c.wait_for(published.len(), CATCH_UP).await;
        let have = c.seen.lock().deduped().0.len();
        assert!(ok, "client {i} has {have} of {} events", published.len());
    }
    let mut dups = 0;
    let mut seen_all = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let seen = c.stop().await;
        let (events, d) = seen.deduped();
        dups += d;
        let ids: Vec<u64> = events.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, published, "client {i}: every event once, in order");
        seen_all.push(seen);
    }
    (dups, seen_all)
}

/// For every client that reconnected: time from `at` to its first event on a new connection.
fn first_events_after(seen: &[Seen], at: Instant) -> Vec<Duration> {
    seen.iter()
        .filter(|s| s.connects > 1)
        .filter_map(|s| {
            s.first_event_after_connect
                .iter()
                .find(|t| **t > at)
                .map(|t| *t - at)
        })
        .collect()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_1_steady_state() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let t = Topology::start(&[]).await;
    let clients = t.clients(vec![body(); 200]).await;
    let published = publish_all(t.lb.url(PUBLISH), 5000, 4, 50, Duration::from_millis(5)).await;
    assert_eq!(published.len(), 5000);
    let (dups, _) = assert_complete(clients, &published).await;
    eprintln!("scenario 1: 5000 events x 200 clients, lost 0, duplicates before dedupe {dups}");
}

/// What a scenario kills mid-stream.
enum Victim {
    /// A herald instance (SIGKILL).
    Herald(usize),
    /// The NATS node a herald instance is connected to.
    NatsNodeOfHerald,
}

/// Kills `victim` while 1,000 events flow to 30 clients; prints what happened.
async fn kill_mid_stream(name: &str, victim: Victim) {
    let mut t = Topology::start(&[]).await;
    let clients = t.clients(vec![body(); 30]).await;
    let url = t.lb.url(PUBLISH);
    let publishing = tokio::spawn(publish_all(url, 1000, 2, 10, Duration::from_millis(20)));
    // Mid-stream: once events are flowing.
    assert!(clients[0].wait_for(200, WAIT).await);
    let killed_at = match victim {
        Victim::Herald(i) => {
            let at = Instant::now();
            drop(t.heralds[i].take());
            at
        }
        Victim::NatsNodeOfHerald => {
            let mut target = None;
            for (i, node) in t.cluster.nodes.iter().enumerate() {
                let v = node.monitor("/connz").await;
                let heralds = v["connections"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("herald-")))
                    .count();
                if heralds > 0 {
                    target = Some(i);
                    break;
                }
            }
            let i = target.expect("some node serves a herald instance");
            let at = Instant::now();
            t.cluster.nodes[i].kill();
            at
        }
    };
    let published = publishing.await.unwrap();
    let (dups, seen) = assert_complete(clients, &published).await;
    let first_after = first_events_after(&seen, killed_at);
    eprintln!(
        "{name}: {} events, lost 0, duplicates before dedupe {dups}, {} clients reconnected, p99 kill -> first event after reconnecting {:?}",
        published.len(),
        first_after.len(),
        p99(first_after)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_2_sigkill_one_instance() {
    let _serial = ONE_AT_A_TIME.lock().await;
    kill_mid_stream("scenario 2 (SIGKILL one herald)", Victim::Herald(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_3_rolling_restart() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut t = Topology::start(&[]).await;
    let clients = t.clients(vec![body(); 30]).await;
    let url = t.lb.url(PUBLISH);
    let publishing = tokio::spawn(publish_all(url, 1500, 2, 5, Duration::from_millis(20)));
    for i in 0..3 {
        let mut old = t.heralds[i].take().unwrap();
        old.terminate();
        let status = old.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "instance {i} drained cleanly: {status:?}");
        drop(old);
        t.heralds[i] = Some(t.start_instance(i).await);
        t.lb.wait_server(&format!("herald{}", i + 1), "UP").await;
    }
    let published = publishing.await.unwrap();
    let (dups, seen) = assert_complete(clients, &published).await;
    let reconnects: usize = seen.iter().map(|s| s.connects - 1).sum();
    eprintln!(
        "scenario 3: {} events, lost 0, duplicates before dedupe {dups}, reconnects {reconnects}",
        published.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_4_kill_one_nats_node() {
    let _serial = ONE_AT_A_TIME.lock().await;
    kill_mid_stream(
        "scenario 4 (kill a NATS node serving a herald)",
        Victim::NatsNodeOfHerald,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_5_a_client_away_for_10s() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let t = Topology::start(&[]).await;
    let mut clients = t.clients(vec![body(); 2]).await;
    let first = publish_all(t.lb.url(PUBLISH), 100, 1, 10, Duration::ZERO).await;
    assert!(clients[0].wait_for(100, WAIT).await);
    let away = clients.remove(0).stop().await;
    let last = away.deduped().0.last().map(|(id, _)| *id);
    let during = tokio::spawn(publish_all(
        t.lb.url(PUBLISH),
        200,
        2,
        10,
        Duration::from_millis(50),
    ));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let back = EventSource::resume(t.lb.url(SUBSCRIBE), token_for("reader", HOUR), body(), last);
    let missed = during.await.unwrap();
    if !back.wait_for(missed.len(), CATCH_UP).await {
        let s = back.seen.lock().clone();
        panic!(
            "the returning client did not catch up: last {last:?}, {} of {} events (first {:?}), controls {:?}, connects {}",
            s.deduped().0.len(),
            missed.len(),
            s.events.first(),
            s.controls,
            s.connects
        );
    }
    let seen = back.stop().await;
    let ids: Vec<u64> = seen.deduped().0.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, missed, "exactly what it missed, in order");
    let mut all = first;
    all.extend(missed);
    all.sort_unstable();
    assert_complete(clients, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_6_slow_client_resumes() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let t = Topology::start(&[
        ("STREAM__QUEUE_FRAMES", "8"),
        ("STREAM__CLOSE_TIMEOUT", "60s"),
    ])
    .await;
    let clients = t.clients(vec![body(); 3]).await;
    clients[0]
        .paused
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // Big events fill the socket buffers quickly, then the 8-frame queue.
    let seqs = Arc::new(Mutex::new(Vec::new()));
    let http = reqwest::Client::new();
    let w = token_for("writer", HOUR);
    for k in 0..400 {
        let mut e = event("secret:updated", "p1", "prod", &format!("/big/{k}"));
        e["data"] = json!({"blob": "b".repeat(32 * 1024)});
        let r = http
            .post(t.lb.url(PUBLISH))
            .bearer_auth(&w)
            .json(&e)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        seqs.lock()
            .push(v["events"][0]["sequence"].as_u64().unwrap());
    }
    clients[0]
        .paused
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let published = seqs.lock().clone();
    let slow_closed = {
        let c = &clients[0];
        assert!(c.wait_for(published.len(), CATCH_UP).await);
        let controls = c.seen.lock().controls.clone();
        controls
            .iter()
            .any(|(k, v)| k == "error" && v["code"] == "slow_consumer")
    };
    assert!(slow_closed, "the slow client was closed as a slow consumer");
    let (dups, _) = assert_complete(clients, &published).await;
    eprintln!(
        "scenario 6: {} events, lost 0, duplicates before dedupe {dups}",
        published.len()
    );
}
