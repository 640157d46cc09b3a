//! The full topology without Docker: a 3-node NATS cluster with JetStream
//! (an R3 replay stream), three herald processes each preferring its own
//! node, and haproxy on loopback configured from docker/haproxy.cfg.
//! Clients connect only through haproxy (tests/scenarios.rs, benches/storm.rs).

use std::time::Duration;

use serde_json::Value;

use super::eventsource::EventSource;
use super::haproxy::Haproxy;
use super::nats::{free_low_port, urls_env, NatsCluster};
use super::*;

const HOUR: Duration = Duration::from_secs(3600);

pub struct Topology {
    pub cluster: NatsCluster,
    pub heralds: Vec<Option<Herald>>,
    pub ports: Vec<(u16, u16)>,
    pub lb: Haproxy,
    extra: Vec<(String, String)>,
}

impl Topology {
    /// The topology, each instance with these extra settings.
    pub async fn start(extra: &[(&str, &str)]) -> Topology {
        Self::start_with(extra, 4096).await
    }

    /// [`start`](Self::start), haproxy taking up to `maxconn` connections.
    pub async fn start_with(extra: &[(&str, &str)], maxconn: usize) -> Topology {
        let cluster = NatsCluster::start_jetstream().await;
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_low_port(), free_low_port())).collect();
        let mut heralds = Vec::new();
        for i in 0..3 {
            heralds.push(Some(start_instance(&cluster, &ports, &extra, i).await));
        }
        let lb = Haproxy::start_with(&ports, maxconn).await;
        Topology {
            cluster,
            heralds,
            ports,
            lb,
            extra,
        }
    }

    /// Starts instance `i` again (after it was stopped).
    pub async fn start_instance(&self, i: usize) -> Herald {
        start_instance(&self.cluster, &self.ports, &self.extra, i).await
    }

    /// Waits until `n` streams are open across the live instances.
    pub async fn wait_streams(&self, n: usize, within: Duration) {
        eventually(within, format!("{n} streams never opened"), || async {
            let mut total = 0.0;
            for h in self.heralds.iter().flatten() {
                total += h.metric("herald_connections").await;
            }
            (total as usize == n).then_some(())
        })
        .await
    }

    /// Starts one client per body (as `reader`) and waits until all their
    /// streams are open.
    pub async fn clients(&self, bodies: Vec<Value>) -> Vec<EventSource> {
        let n = bodies.len();
        let c: Vec<EventSource> = bodies
            .into_iter()
            .map(|b| EventSource::start(self.lb.url(SUBSCRIBE), token_for("reader", HOUR), b))
            .collect();
        let within = WAIT.max(Duration::from_millis(20) * n as u32);
        for client in &c {
            // Open: each receives everything published from now on.
            assert!(client.wait_opened(1, within).await, "a stream never opened");
        }
        self.wait_streams(n, within).await;
        c
    }
}

async fn start_instance(
    cluster: &NatsCluster,
    ports: &[(u16, u16)],
    extra: &[(String, String)],
    i: usize,
) -> Herald {
    // Each instance prefers its own node and fails over to the others.
    let mut urls = cluster.urls();
    urls.rotate_left(i);
    let (public, admin) = ports[i];
    let mut b = HeraldBuilder::new()
        .ports(public, admin)
        .env("NATS__URLS", &urls_env(&urls))
        .env("NATS__PRESENCE_INTERVAL", "500ms")
        .env("REPLAY__ENABLED", "true")
        .env("REPLAY__REPLICAS", "3")
        .env("STREAM__RETRY", "300ms")
        // Every client is `reader`: the per-identity limits (cluster-wide,
        // through presence) are not what these scenarios measure.
        .env("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "10000")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY", "10000")
        .env("LIMITS__SUBSCRIBE_RATE", "10000")
        .env("LIMITS__SUBSCRIBE_BURST", "10000")
        .env("SHUTDOWN__GRACE", "2500ms")
        .env("SHUTDOWN__DRAIN_WINDOW", "1s");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    let h = b.start();
    // The replay stream (R3) is set up once the cluster has a leader.
    h.wait_ready_within(200, Duration::from_secs(30)).await;
    h
}
