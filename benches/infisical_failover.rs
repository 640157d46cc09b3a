//! How long Infisical's clients take to be consistent again when the herald
//! instance serving them is drained or killed, on the deployment of
//! docker/infisical-proxy.cfg: nats-server with JetStream, two herald
//! instances with replay and the Infisical listener, haproxy in front.
//!
//! The clients are the ports in tests/common/infisical.rs driven by the
//! timing rules of their sources (`../shared/infisical.md`):
//!
//! - operator: a named event other than `ping` enqueues a re-fetch after a
//!   random 0-10 s; a read error reconnects after 1 s; any other end leaves
//!   it blind until its watchdog (checked every 30 s, fires when no ping
//!   came for 2 minutes), which reconnects after 1 s without a re-fetch;
//! - CLI proxy: an event purges (and re-fetches) at once; any end
//!   reconnects after 2 s plus up to 1 s of jitter.
//!
//! First both stay connected for FAILOVER_STEADY_SECS (190) with herald's
//! default 15 s heartbeat, checking that neither client's liveness rule
//! ever fires. Then, for each client and each of `drain` (SIGTERM) and
//! `kill` (SIGKILL) of the instance serving it, one event is published on
//! the other instance as soon as the client's stream has ended (while it is
//! away: the case herald's remembered positions are for), and the time from the drain or kill
//! until the client is consistent (the operator's re-fetch started after
//! the event, the CLI's purge of its path) is printed, with what it took:
//! how the stream ended, when it reconnected.
//!
//! Run: `cargo bench --bench infisical_failover` (about 6 minutes; needs
//! nats-server and haproxy, which scripts/install-test-tools installs).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::infisical::{cli_body, cli_decode, open_at, operator_body, Deployment, Operator};
use common::nats::NatsServer;
use common::{event, token_for, Herald, SUBSCRIBE};
use rand::Rng;
use serde_json::json;

const HOUR: Duration = Duration::from_secs(3600);
const WATCHDOG_EVERY: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Client {
    Operator,
    Cli,
}

async fn deploy() -> (NatsServer, Deployment) {
    let nats = NatsServer::start_jetstream();
    let d = Deployment::start(&nats, 2, &[]).await;
    (nats, d)
}

async fn connections(h: &Herald) -> f64 {
    h.metric("herald_connections").await
}

async fn publish(h: &Herald, path: &str) -> Instant {
    let mut e = event("secret:updated", "p1", "prod", path);
    e["data"]["secretKeys"] = json!(["K"]);
    let r = h.publish_raw(&token_for("dev-publisher", HOUR), &e).await;
    assert_eq!(r.status(), 202);
    Instant::now()
}

/// What one client went through after the fault.
struct Outcome {
    consistent_after: Duration,
    story: Vec<String>,
}

/// Runs `client` on stream `op` from `start` until it is consistent with an
/// event on `path` published at `published()` (set once known).
async fn follow(
    client: Client,
    mut op: Operator,
    url: &str,
    path: &str,
    fault_at: Instant,
    published: &tokio::sync::watch::Receiver<Option<Instant>>,
    ended: tokio::sync::oneshot::Sender<()>,
) -> Outcome {
    let mut ended = Some(ended);
    let token = token_for("reader", HOUR);
    let body = match client {
        Client::Operator => operator_body(path),
        Client::Cli => cli_body(),
    };
    let registry_start = Instant::now() - Duration::from_secs(7); // any phase
    let mut last_ping = Instant::now();
    let mut pings = op.pings;
    let mut story = Vec::new();
    let since = |t: Instant| format!("{:.1} s", t.duration_since(fault_at).as_secs_f64());
    loop {
        let got = op.next_within(Duration::from_millis(200)).await;
        if op.pings != pings {
            pings = op.pings;
            last_ping = Instant::now();
        }
        if let Some(d) = got {
            let now = Instant::now();
            let after_event = published.borrow().is_some_and(|p| p <= now);
            match client {
                Client::Operator => {
                    let delay = Duration::from_millis(rand::thread_rng().gen_range(0..10_000));
                    story.push(format!(
                        "{} at {}: re-fetch in {:.1} s",
                        d.event,
                        since(now),
                        delay.as_secs_f64()
                    ));
                    if after_event {
                        let refetch = now + delay;
                        tokio::time::sleep_until(refetch.into()).await;
                        return Outcome {
                            consistent_after: refetch.duration_since(fault_at),
                            story,
                        };
                    }
                }
                Client::Cli => {
                    let purged = cli_decode(&d).is_some_and(|(_, p)| p[0]["secretPath"] == path);
                    story.push(format!("{} at {}", d.event, since(now)));
                    if purged && after_event {
                        return Outcome {
                            consistent_after: now.duration_since(fault_at),
                            story,
                        };
                    }
                }
            }
            continue;
        }
        if !op.ended {
            continue;
        }
        if let Some(tx) = ended.take() {
            let _ = tx.send(());
        }
        let now = Instant::now();
        let reconnect_at = match client {
            Client::Operator if op.read_error => {
                story.push(format!("read error at {}", since(now)));
                now + Duration::from_secs(1)
            }
            Client::Operator => {
                // Blind: the next watchdog tick that finds no ping for 2 min.
                let mut tick = registry_start;
                while tick <= now || tick.duration_since(last_ping) <= PING_TIMEOUT {
                    tick += WATCHDOG_EVERY;
                }
                story.push(format!(
                    "silent end at {}; watchdog at {}",
                    since(now),
                    since(tick)
                ));
                tick + Duration::from_secs(1)
            }
            Client::Cli => {
                story.push(format!("end at {}", since(now)));
                let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..1000));
                now + Duration::from_secs(2) + jitter
            }
        };
        tokio::time::sleep_until(reconnect_at.into()).await;
        story.push(format!("reconnect at {}", since(Instant::now())));
        op = Operator::new(open_at(url, &token, &body).await);
        last_ping = Instant::now();
        pings = op.pings;
    }
}

async fn fault(client: Client, kill: bool) -> Outcome {
    let (_nats, d) = deploy().await;
    let url = d.proxy.url(SUBSCRIBE);
    let path = "/apps";
    let body = match client {
        Client::Operator => operator_body(path),
        Client::Cli => cli_body(),
    };
    let op = Operator::new(open_at(&url, &token_for("reader", HOUR), &body).await);
    let serving = if connections(&d.heralds[0]).await > 0.0 {
        0
    } else {
        1
    };
    let other = &d.heralds[1 - serving];
    // Positions are saved every second: the stream has one before the fault.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (tx, rx) = tokio::sync::watch::channel(None);
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    let fault_at = Instant::now();
    d.heralds[serving].signal(if kill { "KILL" } else { "TERM" });
    let follow = follow(client, op, &url, path, fault_at, &rx, end_tx);
    // The event comes while the client is away: as soon as its stream ended.
    let publish = async {
        let _ = tokio::time::timeout(Duration::from_secs(10), end_rx).await;
        let at = publish(other, path).await;
        let _ = tx.send(Some(at));
    };
    let limit = Duration::from_secs(300);
    match tokio::time::timeout(limit, async { tokio::join!(follow, publish).0 }).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome {
            consistent_after: limit,
            story: vec!["NOT consistent within 300 s".into()],
        },
    }
}

/// Both clients connected for `secs`: neither liveness rule may fire.
async fn steady(secs: u64) {
    let (_nats, d) = deploy().await;
    let url = d.proxy.url(SUBSCRIBE);
    let token = token_for("reader", HOUR);
    let mut op = Operator::new(open_at(&url, &token, &operator_body("/apps")).await);
    let mut cli = Operator::new(open_at(&url, &token, &cli_body()).await);
    let start = Instant::now();
    let mut last_ping = Instant::now();
    let mut longest = Duration::ZERO;
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        let got = op.next_within(Duration::from_millis(500)).await;
        assert!(got.is_none() && !op.ended, "the operator's stream: {got:?}");
        if op.pings != pings {
            pings = op.pings;
            longest = longest.max(last_ping.elapsed());
            last_ping = Instant::now();
        }
        assert!(
            last_ping.elapsed() < PING_TIMEOUT,
            "the operator's watchdog fired"
        );
        let got = cli.next_within(Duration::from_millis(1)).await;
        assert!(
            got.is_none() && !cli.ended,
            "the CLI's stream ended: {got:?}"
        );
    }
    println!(
        "steady {secs} s: operator saw {pings} pings, longest gap {:.1} s (its watchdog: 120 s); the CLI's stream never ended",
        longest.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = std::env::var("FAILOVER_STEADY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(190);
    steady(secs).await;
    println!("| client | fault | consistent after | what happened |");
    println!("| --- | --- | --- | --- |");
    for kill in [false, true] {
        for client in [Client::Cli, Client::Operator] {
            let o = fault(client, kill).await;
            println!(
                "| {client:?} | {} | {:.1} s | {} |",
                if kill { "SIGKILL" } else { "drain (SIGTERM)" },
                o.consistent_after.as_secs_f64(),
                o.story.join("; ")
            );
        }
    }
}
