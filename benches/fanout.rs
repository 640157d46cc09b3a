//! Fan-out load benchmark: the real herald binary, N real SSE connections,
//! E events published at R per second through the publish API.
//!
//! Prints connections, deliveries/s, lost, duplicates, publish-to-parse latency
//! percentiles, herald's CPU time per delivery (from /proc/PID/stat over the
//! publish window) and RSS per idle connection.
//!
//! Run: `scripts/bench-fanout` (raises the open-file limit), or
//! `FANOUT_CONNS=1000 FANOUT_EVENTS=2000 FANOUT_RATE=200 cargo bench --bench fanout`.
//!
//! NATS mode: `FANOUT_NATS=cluster` (a 3-node nats-server cluster) or
//! `FANOUT_NATS=single`, with `FANOUT_INSTANCES` herald instances (default 3),
//! each on its own node. Project p's streams all live on instance p mod N and
//! events are published round-robin through every instance, so the bench also
//! reports how many NATS messages each instance received for projects it had
//! no stream for (interest-based subscriptions: must be 0).
//!
//! Scenario D: `FANOUT_HOLD_SECS=60 FANOUT_EVENTS=1` holds the streams idle and
//! reports whether memory stays flat.
//!
//! Peer: `FANOUT_TARGET=nchan` runs the same load against nginx + nchan (one
//! worker, eventsource subscribers, `nchan_subscriber_first_message newest`),
//! with the same bytes per event; `scripts/bench-compare` runs both.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{nats, Herald, HeraldBuilder, Parser, SECRET, WAIT};
use futures_util::StreamExt;
use herald::auth::Signer;
use serde_json::json;

const IDENTITIES: usize = 100;

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// (utime + stime) in seconds, and RSS in bytes, of a process.
fn proc_stats(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is index 0, utime 11, stime 12, rss (pages) 21.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let rss = ticks(21) as u64 * 4096;
    (cpu, rss)
}

fn start_herald(queue_frames: usize, nats_urls: &[String]) -> Herald {
    let mut policy = String::from("p, role:bench, *, *, subscribe, *, /**, allow\np, bench-publisher, *, *, publish, *, /**, allow\n");
    for i in 0..IDENTITIES {
        policy.push_str(&format!("g, bench-{i}, role:bench, *\n"));
    }
    let extra = format!(
        "[limits]\nconnections_per_identity_project = 1000000\nconnections_per_identity = 1000000\nmax_connections = 1000000\nsubscribe_rate = 1000000.0\nsubscribe_burst = 1000000.0\n\
         [stream]\nqueue_frames = {queue_frames}\n"
    );
    let mut b = HeraldBuilder::new()
        .policy(&policy)
        .config(&format!("[auth]\nhs_secret = \"{SECRET}\"\n{extra}"))
        .log("warn");
    // FANOUT_HERALD_WORKERS: herald's runtime threads (nchan runs one worker).
    if let Ok(n) = std::env::var("FANOUT_HERALD_WORKERS") {
        b = b.env("SERVER__WORKER_THREADS", &n);
    }
    if !nats_urls.is_empty() {
        b = b.env("NATS__URLS", &nats::urls_env(nats_urls));
    }
    b.start()
}

/// nginx + nchan, one worker, on a loopback port.
struct Nchan {
    master: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Nchan {
    fn drop(&mut self) {
        // SIGKILL on the master alone would leave its worker running (and
        // holding a core) into the next run.
        let workers = children(self.master.id());
        let _ = self.master.kill();
        let _ = self.master.wait();
        for w in workers {
            let _ = Command::new("kill").args(["-9", &w.to_string()]).status();
        }
    }
}

fn start_nchan() -> Nchan {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = nats::free_low_port();
    let module = ["/usr/lib/nginx/modules/ngx_nchan_module.so", "/usr/share/nginx/modules/ngx_nchan_module.so"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("nchan is required: apt-get install nginx-light libnginx-mod-nchan (scripts/bench-compare does)");
    let d = dir.path().display().to_string();
    let conf = format!(
        "load_module {module};\nworker_processes 1;\nworker_rlimit_nofile 200000;\ndaemon off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 100000; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
           server {{\n    listen 127.0.0.1:{port};\n\
             location ~ ^/sub/([\\w-]+)$ {{ nchan_subscriber eventsource; nchan_channel_id $1; nchan_subscriber_first_message newest; }}\n\
             location ~ ^/pub/([\\w-]+)$ {{ nchan_publisher; nchan_channel_id $1; nchan_message_buffer_length 10; }}\n\
           }}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("nginx is required: apt-get install nginx-light");
    let master = Command::new(nginx)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx");
    let deadline = Instant::now() + WAIT;
    // A synchronous wait (no runtime yet): the first connect that succeeds.
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nchan {
        master,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

/// The nginx worker processes (children of the master).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[tokio::main]
async fn main() {
    let conns = env_usize("FANOUT_CONNS", 1000);
    let events = env_usize("FANOUT_EVENTS", 2000);
    let rate = env_usize("FANOUT_RATE", 200).max(1);
    let projects = env_usize("FANOUT_PROJECTS", 1).max(1);
    let queue_frames = env_usize("FANOUT_QUEUE_FRAMES", 1024);
    let mode = std::env::var("FANOUT_NATS").unwrap_or_default();
    let target = std::env::var("FANOUT_TARGET").unwrap_or_else(|_| "herald".into());
    let nchan = match target.as_str() {
        "herald" => None,
        "nchan" => Some(start_nchan()),
        other => panic!("FANOUT_TARGET must be herald or nchan, not {other:?}"),
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    // The bus: embedded, or a nats-server (cluster) with one herald per node.
    let mut _servers: Vec<nats::NatsServer> = Vec::new();
    let mut node_urls: Vec<String> = Vec::new();
    match mode.as_str() {
        "" => {}
        "single" => {
            let s = nats::NatsServer::start();
            node_urls.push(s.url());
            _servers.push(s);
        }
        "cluster" => {
            let c = nats::NatsCluster::start().await;
            node_urls = c.urls();
            _servers = c.nodes;
        }
        other => panic!("FANOUT_NATS must be empty, single or cluster, not {other:?}"),
    }
    let n_instances = if mode.is_empty() {
        1
    } else {
        env_usize("FANOUT_INSTANCES", 3).max(1)
    };
    let heralds: Vec<Herald> = (0..if nchan.is_some() { 0 } else { n_instances })
        .map(|i| {
            let urls: Vec<String> = if node_urls.is_empty() {
                vec![]
            } else {
                vec![node_urls[i % node_urls.len()].clone()]
            };
            start_herald(queue_frames, &urls)
        })
        .collect();
    for h in &heralds {
        h.wait_ready(200).await;
    }
    let pids: Vec<u32> = match &nchan {
        Some(n) => children(n.master.id()),
        None => heralds.iter().map(Herald::pid).collect(),
    };
    let nchan_base = nchan.as_ref().map(|n| n.base.clone());
    let instance_of_project = |p: usize| p % n_instances;

    let signer =
        Signer::hmac(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes()).expect("a valid key");
    let tokens: Vec<String> = (0..IDENTITIES)
        .map(|i| {
            signer
                .mint(&format!("bench-{i}"), Duration::from_secs(3600), None, None)
                .unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before: u64 = pids.iter().map(|p| proc_stats(*p).1).sum();
    let expected_per_conn: Vec<usize> = (0..conns)
        .map(|i| (0..events).filter(|e| e % projects == i % projects).count())
        .collect();
    let ready = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        let client = client.clone();
        let project = i % projects;
        let url = match &nchan_base {
            Some(base) => format!("{base}/sub/proj-{project}"),
            None => format!(
                "http://{}/api/v1/events/subscribe/project-events",
                heralds[instance_of_project(project)].public
            ),
        };
        let is_nchan = nchan_base.is_some();
        let token = tokens[i % IDENTITIES].clone();
        let body = json!({"projectId": format!("proj-{project}"), "register": [{"event": "secret:updated"}]});
        let ready = ready.clone();
        let expect = expected_per_conn[i];
        tasks.push(tokio::spawn(async move {
            let req = if is_nchan {
                client.get(url).header("accept", "text/event-stream")
            } else {
                client.post(url).bearer_auth(token).json(&body)
            };
            let resp = req.send().await.expect("subscribe");
            assert_eq!(resp.status(), 200);
            let mut stream = resp.bytes_stream();
            let mut parser = Parser::lenient();
            let mut lat = Vec::with_capacity(expect);
            let mut ids = HashSet::with_capacity(expect);
            let mut dups = 0usize;
            // herald's first chunk is the retry: hint (the stream is registered
            // by then); nchan answers the headers once it has subscribed.
            if !is_nchan {
                if let Some(Ok(b)) = stream.next().await {
                    parser.push(&b);
                }
            }
            ready.wait().await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            while lat.len() + dups < expect {
                let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(Ok(b))) => b,
                    _ => break,
                };
                parser.push(&chunk);
                while let Some(ev) = parser.next() {
                    // The send time and id, found in the data without
                    // parsing its JSON (the load generator shares the cores).
                    let v = &ev.data;
                    let sent = v
                        .split("\"sentNanos\":")
                        .nth(1)
                        .and_then(|r| r.split(['}', ',']).next())
                        .and_then(|n| n.parse::<u128>().ok());
                    let id = v
                        .split("\"id\":\"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .map(str::to_owned);
                    if let (Some(id), Some(sent)) = (id, sent) {
                        if ids.insert(id) {
                            lat.push((now_nanos().saturating_sub(sent)) as u64);
                        } else {
                            dups += 1;
                        }
                    }
                }
            }
            (lat, dups, expect)
        }));
    }
    ready.wait().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after: u64 = pids.iter().map(|p| proc_stats(*p).1).sum();
    // FANOUT_HOLD_SECS: hold the streams idle (heartbeats only) and report
    // whether memory stays flat (scenario D).
    let hold = env_usize("FANOUT_HOLD_SECS", 0);
    if hold > 0 {
        let cpu_before: f64 = pids.iter().map(|p| proc_stats(*p).0).sum();
        tokio::time::sleep(Duration::from_secs(hold as u64)).await;
        let rss_held: u64 = pids.iter().map(|p| proc_stats(*p).1).sum();
        let cpu_held: f64 = pids.iter().map(|p| proc_stats(*p).0).sum();
        println!(
            "{target}: {conns} idle streams held {hold}s: RSS {} KB after connecting, {} KB after holding ({:.1} KB per stream), {:.2} CPU s while idle",
            rss_after / 1024,
            rss_held / 1024,
            rss_held.saturating_sub(rss_before) as f64 / 1024.0 / conns as f64,
            cpu_held - cpu_before
        );
    }
    let cpu0: f64 = pids.iter().map(|p| proc_stats(*p).0).sum();
    let mut received0 = Vec::new();
    for h in &heralds {
        received0.push(
            h.metric("herald_events_received_total{source=\"nats\"}")
                .await,
        );
    }
    let publisher = signer
        .mint("bench-publisher", Duration::from_secs(3600), None, None)
        .unwrap();
    let t0 = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for e in 0..events {
        tick.tick().await;
        // A 1 KiB payload: the same bytes per event whatever the broker.
        let ev = json!({"specversion": "1.0", "id": format!("e{e}"), "source": "/bench", "type": "secret:updated",
            "projectid": format!("proj-{}", e % projects), "environment": "prod", "secretpath": "/apps/db",
            "data": {"pad": "x".repeat(1024), "sentNanos": now_nanos()}});
        let r = match &nchan_base {
            // The same bytes: the CloudEvent JSON as the message body.
            Some(base) => client
                .post(format!("{base}/pub/proj-{}", e % projects))
                .body(ev.to_string()),
            None => {
                let via = &heralds[e % n_instances].public;
                client
                    .post(format!("http://{via}/api/v1/events/publish"))
                    .bearer_auth(&publisher)
                    .json(&ev)
            }
        }
        .send()
        .await
        .expect("publish");
        assert!(r.status().is_success(), "publish: {}", r.status());
    }
    let publish_window = t0.elapsed();
    let mut all = Vec::new();
    let (mut lost, mut dups, mut delivered) = (0usize, 0usize, 0usize);
    for t in tasks {
        let (lat, d, expect) = t.await.unwrap();
        lost += expect.saturating_sub(lat.len());
        dups += d;
        delivered += lat.len();
        all.extend(lat);
    }
    let total_window = t0.elapsed();
    let cpu1: f64 = pids.iter().map(|p| proc_stats(*p).0).sum();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1e6
    };
    let bus = if nchan.is_some() {
        "nginx + nchan (1 worker)".to_owned()
    } else if mode.is_empty() {
        "embedded bus".to_owned()
    } else {
        format!(
            "NATS {mode} ({} node(s)), {n_instances} instances",
            node_urls.len()
        )
    };
    println!("{target} fan-out, {bus}: {conns} connections over {projects} project(s), {events} events at {rate}/s (1 KiB payload)");
    println!("  connected            {conns}");
    println!("  delivered            {delivered} (lost {lost}, duplicates {dups})");
    println!(
        "  deliveries/s         {:.0} (publish window {:.2}s, all received after {:.2}s)",
        delivered as f64 / publish_window.as_secs_f64(),
        publish_window.as_secs_f64(),
        total_window.as_secs_f64()
    );
    println!(
        "  latency ms           p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "  server CPU/delivery  {:.2} us ({:.2} CPU s, all server processes)",
        (cpu1 - cpu0) * 1e6 / delivered.max(1) as f64,
        cpu1 - cpu0
    );
    println!(
        "  RSS per idle conn    {:.1} KB ({} -> {} KB, all server processes)",
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0 / conns as f64,
        rss_before / 1024,
        rss_after / 1024
    );
    if !mode.is_empty() && nchan.is_none() {
        for (i, h) in heralds.iter().enumerate() {
            let got = h
                .metric("herald_events_received_total{source=\"nats\"}")
                .await
                - received0[i];
            let own = (0..events)
                .filter(|e| instance_of_project(e % projects) == i)
                .count() as f64;
            println!("  instance {i}: NATS messages received {got:.0}, for its own projects {own:.0}, for projects without a stream here {:.0}", got - own);
        }
    }
}
