//! Resume storm benchmark, on the full topology of tests/scenarios.rs: a
//! 3-node JetStream cluster (default server settings), three herald
//! instances with replay (R3) behind haproxy from docker/haproxy.cfg, and N
//! EventSource-like clients (reconnecting with `Last-Event-ID`, honouring
//! `retry:`) spread over P projects, while events are published at R per
//! second through haproxy. Then, under load, one of:
//!
//! - `herald`: SIGKILL one herald instance; its clients move to the others;
//! - `meta-leader`: SIGKILL the JetStream meta leader (a NATS node).
//!
//! Printed per run: clients moved and the time from the kill until each
//! moved client had its first event on its new connection (p50/p99/max);
//! the delivery delay of events published in the window after the kill
//! (acknowledged → arrived, p50/p99/max over every client); events lost
//! (must be 0); duplicates delivered; `reconnect` and `gap` events clients
//! got; connection attempts; replay consumers created; and the CPU seconds
//! herald and nats-server used from the kill until every client caught up.
//!
//! Run: `cargo bench --bench storm`, or e.g.
//! `STORM_CLIENTS=6000 STORM_KILL=herald cargo bench --bench storm`.
//! Settings: STORM_CLIENTS (3000), STORM_PROJECTS (30), STORM_RATE (20
//! events/s), STORM_KILL (`herald,meta-leader`), STORM_WARM_SECS (5),
//! STORM_AFTER_SECS (20: publishing after the kill), STORM_READ_METHOD
//! (`direct` or `consumer`: herald's `replay.read_method`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::topology::Topology;
use common::{event, token_for, PUBLISH};
use parking_lot::Mutex;
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) a process used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    let show = |d: Duration| {
        if d < Duration::from_secs(1) {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        } else {
            format!("{:.2} s", d.as_secs_f64())
        }
    };
    format!(
        "p50 {}, p99 {}, max {}",
        show(at(0.50)),
        show(at(0.99)),
        show(v[v.len() - 1])
    )
}

/// Everything published: sequence → (project, acknowledged at).
type Published = Arc<Mutex<HashMap<u64, (usize, Instant)>>>;

/// Publishes `rate` events per second round-robin over `projects`, through
/// haproxy, retrying each (same id) until it is stored, until `stop`.
async fn publish(
    url: String,
    projects: usize,
    rate: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Published {
    let published: Published = Arc::default();
    let http = reqwest::Client::new();
    let w = token_for("writer", HOUR);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let every = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut tick = tokio::time::interval(every);
    let mut k = 0usize;
    let mut inflight = tokio::task::JoinSet::new();
    while !*stop.borrow() {
        tick.tick().await;
        let p = k % projects;
        let mut e = event(
            "secret:updated",
            &format!("p{p}"),
            "prod",
            &format!("/e{k}"),
        );
        e["id"] = json!(format!("{run}-{k}"));
        let (http, url, w, published) = (http.clone(), url.clone(), w.clone(), published.clone());
        inflight.spawn(async move {
            loop {
                let r = http.post(&url).bearer_auth(&w).json(&e).send().await;
                if let Ok(r) = r {
                    if r.status() == 202 {
                        if let Ok(v) = r.json::<Value>().await {
                            if let Some(seq) = v["events"][0]["sequence"].as_u64() {
                                published.lock().insert(seq, (p, Instant::now()));
                                return;
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        k += 1;
    }
    while inflight.join_next().await.is_some() {}
    published
}

async fn sum_metric(t: &Topology, name: &str) -> f64 {
    let mut total = 0.0;
    for h in t.heralds.iter().flatten() {
        total += h.metric(name).await;
    }
    total
}

fn cpu_of(t: &Topology) -> (f64, f64) {
    let herald: f64 = t
        .heralds
        .iter()
        .flatten()
        .map(|h| cpu_seconds(h.pid()))
        .sum();
    let nats: f64 = t.cluster.nodes.iter().map(|n| cpu_seconds(n.pid())).sum();
    (herald, nats)
}

async fn storm(victim: &str, n: usize, projects: usize, rate: usize) {
    let warm = Duration::from_secs(env_usize("STORM_WARM_SECS", 5) as u64);
    let after = Duration::from_secs(env_usize("STORM_AFTER_SECS", 20) as u64);
    let n_str = (n * 2).to_string();
    let method = std::env::var("STORM_READ_METHOD").ok();
    let mut extra = vec![
        ("LIMITS__CONNECTIONS_PER_IDENTITY", n_str.as_str()),
        ("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", n_str.as_str()),
    ];
    if let Some(m) = &method {
        extra.push(("REPLAY__READ_METHOD", m.as_str()));
    }
    let method = method.as_deref().unwrap_or("default");
    let mut t = Topology::start_with(&extra, n + 1000).await;
    let bodies: Vec<Value> = (0..n)
        .map(|i| json!({"projectId": format!("p{}", i % projects), "register": [{"event": "secret:updated"}]}))
        .collect();
    let opened = Instant::now();
    let clients = t.clients(bodies).await;
    eprintln!(
        "[{victim}] {n} clients open in {:.1} s",
        opened.elapsed().as_secs_f64()
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish(t.lb.url(PUBLISH), projects, rate, stop_rx));
    tokio::time::sleep(warm).await;
    let connects_before: Vec<usize> = clients.iter().map(|c| c.seen.lock().connects).collect();
    let consumers_before = sum_metric(&t, "herald_replay_reads_total{method=\"consumer\"}").await;
    let directs_before = sum_metric(&t, "herald_replay_reads_total{method=\"direct\"}").await;
    let nones_before = sum_metric(&t, "herald_replay_reads_total{method=\"none\"}").await;
    let cpu_before = cpu_of(&t);
    let killed_at = Instant::now();
    let (cpu_lost_herald, survivors_note) = match victim {
        "herald" => {
            let h = t.heralds[0].take().expect("instance 0");
            let used = cpu_seconds(h.pid());
            drop(h); // SIGKILL
            (used, "instances 1 and 2")
        }
        _ => {
            let v = t.cluster.nodes[0].monitor("/jsz").await;
            let leader = v["meta_cluster"]["leader"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let i = leader
                .strip_prefix("js-")
                .and_then(|d| d.parse::<usize>().ok())
                .map(|d| d - 1)
                .expect("the meta leader is one of js-1..3");
            eprintln!("[{victim}] killing the meta leader {leader}");
            t.cluster.nodes[i].kill();
            (0.0, "all instances")
        }
    };
    tokio::time::sleep(after).await;
    stop_tx.send_replace(true);
    let published = publisher.await.expect("publisher");
    let last_publish = Instant::now();
    let published = std::mem::take(&mut *published.lock());
    let mut by_project: Vec<Vec<u64>> = vec![Vec::new(); projects];
    for (seq, (p, _)) in &published {
        by_project[*p].push(*seq);
    }
    for v in &mut by_project {
        v.sort_unstable();
    }
    // Catch-up: every client has every event of its project.
    for (i, c) in clients.iter().enumerate() {
        let want = by_project[i % projects].len();
        if !c.wait_for(want, Duration::from_secs(120)).await {
            eprintln!("[{victim}] client {i} did not catch up within 120 s");
            break;
        }
    }
    let caught_up = last_publish.elapsed();
    let cpu_after = cpu_of(&t);
    let consumers_after = sum_metric(&t, "herald_replay_reads_total{method=\"consumer\"}").await;
    let directs_after = sum_metric(&t, "herald_replay_reads_total{method=\"direct\"}").await;
    let nones_after = sum_metric(&t, "herald_replay_reads_total{method=\"none\"}").await;
    let (mut lost, mut dups, mut reconnects, mut gaps, mut attempts, mut moved) =
        (0, 0, 0, 0, 0, 0);
    let mut first_after = Vec::new();
    let mut delays = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let seen = c.stop().await;
        let (events, d) = seen.deduped();
        dups += d;
        let got: std::collections::HashSet<u64> = events.iter().map(|(id, _)| *id).collect();
        lost += by_project[i % projects]
            .iter()
            .filter(|s| !got.contains(s))
            .count();
        reconnects += seen
            .controls
            .iter()
            .filter(|(k, _)| k == "reconnect")
            .count();
        gaps += seen.controls.iter().filter(|(k, _)| k == "gap").count();
        attempts += seen.connects - connects_before[i];
        if seen.connects > connects_before[i] {
            moved += 1;
            if let Some(t) = seen
                .first_event_after_connect
                .iter()
                .find(|t| **t > killed_at)
            {
                first_after.push(*t - killed_at);
            }
        }
        let mut counted = std::collections::HashSet::new();
        for ((id, _), at) in seen.events.iter().zip(&seen.arrived) {
            if let Some((_, acked)) = published.get(id) {
                if *acked > killed_at && counted.insert(*id) {
                    delays.push(at.saturating_duration_since(*acked));
                }
            }
        }
    }
    println!("storm [{victim}, {method} reads]: {n} clients over {projects} projects, {rate} events/s, {} events published", published.len());
    println!(
        "  clients moved: {moved}; kill -> first event on the new connection: {}",
        percentiles(first_after)
    );
    println!(
        "  delivery delay of events published after the kill (ack -> arrival): {}",
        percentiles(delays)
    );
    println!("  lost {lost}, duplicates delivered {dups}, reconnect events {reconnects}, gap events {gaps}, connection attempts after the kill {attempts}");
    println!(
        "  replay reads after the kill ({survivors_note}): {} by consumer, {} by direct get, {} with nothing to read; every client had every event {:.2} s after the last publish",
        consumers_after - consumers_before,
        directs_after - directs_before,
        nones_after - nones_before,
        caught_up.as_secs_f64()
    );
    println!(
        "  CPU from the kill to catch-up: herald {:.1} s, nats-server {:.1} s",
        (cpu_after.0 - (cpu_before.0 - cpu_lost_herald)).max(0.0),
        cpu_after.1 - cpu_before.1
    );
}

fn main() {
    let n = env_usize("STORM_CLIENTS", 3000);
    let projects = env_usize("STORM_PROJECTS", 30);
    let rate = env_usize("STORM_RATE", 20);
    let kills = std::env::var("STORM_KILL").unwrap_or_else(|_| "herald,meta-leader".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for victim in kills.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        rt.block_on(storm(victim, n, projects, rate));
    }
}
