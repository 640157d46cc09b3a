//! The test kit, shared by the tests and the benches: starts the real
//! `herald` binary on ephemeral loopback ports ([`HeraldBuilder`]), talks to
//! it over real HTTP on the stream path a test chooses ([`Transport`]), parses
//! its SSE streams (one parser, [`sse`]), waits for conditions instead of
//! sleeping ([`eventually`]), and kills it on drop (also when the test
//! panics, printing the tail of its log). Real nats-server processes and
//! haproxy come from [`nats`] and [`haproxy`].

#![allow(dead_code)] // each test binary uses a different part of the kit

pub mod eventsource;
pub mod haproxy;
pub mod idp;
pub mod infisical;
pub mod ingest;
pub mod nats;
pub mod redis;
pub mod sse;
pub mod topology;

pub use sse::{Parser, SseEvent};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use herald::auth::Signer;
use serde_json::{json, Value};

/// The HS256 secret every test instance trusts.
pub const SECRET: &str = "herald-test-secret-0123456789abcdef";
/// How long any awaited condition may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` every 20 ms until it returns `Some`, and returns that;
/// fails the test, saying `what`, after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: impl std::fmt::Display, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match self::within(within, check).await {
        Some(v) => v,
        None => panic!("{what} (waited {within:?})"),
    }
}

/// Polls `check` every 20 ms until it returns `Some` (that value) or
/// `within` has passed (`None`).
pub async fn within<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which of herald's three stream paths a subscribe takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/1.1, the first request of a connection: herald's direct writer.
    Http1Direct,
    /// HTTP/1.1 after another request on a kept-alive connection: hyper's.
    Http1Hyper,
    /// HTTP/2 without TLS (prior knowledge): hyper's.
    H2c,
}

impl Transport {
    pub const ALL: [Transport; 3] = [
        Transport::Http1Direct,
        Transport::Http1Hyper,
        Transport::H2c,
    ];

    /// A client that takes this path.
    fn client(self) -> reqwest::Client {
        let b = reqwest::Client::builder();
        match self {
            // Never reused: every request opens a connection.
            Transport::Http1Direct => b.http1_only().pool_max_idle_per_host(0),
            Transport::Http1Hyper => b.http1_only().pool_max_idle_per_host(1),
            Transport::H2c => b.http2_prior_knowledge(),
        }
        .build()
        .expect("a test HTTP client")
    }
}

/// Runs each stream behaviour test on every stream path: `name(t)` becomes
/// the tests `name::http1_direct`, `name::http1_hyper` and `name::h2c`.
#[macro_export]
macro_rules! transport_tests {
    ($($(#[$meta:meta])* async fn $name:ident($t:ident: Transport) $body:block)*) => {$(
        $(#[$meta])*
        async fn $name($t: Transport) $body
        mod $name {
            use super::*;
            #[tokio::test]
            async fn http1_direct() {
                super::$name(Transport::Http1Direct).await
            }
            #[tokio::test]
            async fn http1_hyper() {
                super::$name(Transport::Http1Hyper).await
            }
            #[tokio::test]
            async fn h2c() {
                super::$name(Transport::H2c).await
            }
        }
    )*};
}

pub const SUBSCRIBE: &str = "/api/v1/events/subscribe/project-events";
pub const PUBLISH: &str = "/api/v1/events/publish";

/// A tool on `PATH` (or in /usr/sbin, /sbin). When it is missing the test
/// skips, unless `REQUIRE_TEST_TOOLS` is set (as `scripts/test` sets it,
/// after installing every tool): then it fails, saying how to get it.
pub fn tool(name: &str, how_to_install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("REQUIRE_TEST_TOOLS").is_none(),
            "{name} is required ({how_to_install}); scripts/test installs it"
        );
        eprintln!("{name} not installed; skipping ({how_to_install}; scripts/test installs it)");
    }
    found
}

pub fn repo_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Mints an HS256 token for `sub` valid for `ttl`.
pub fn token_for(sub: &str, ttl: Duration) -> String {
    Signer::hmac(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes())
        .expect("a valid key")
        .mint(sub, ttl, None, None)
        .expect("minting with a valid key")
}

/// Test policy: a few identities with distinct rights, on top of the shipped roles.
pub const TEST_POLICY_EXTRA: &str = "
p, reader, *, secret:*, subscribe, *, /**, allow
p, reader, *, secret:*, subscribe, *, /internal/**, deny
p, writer, *, secret:*, publish, *, /**, allow
p, prod-db, p1, secret:*, subscribe, prod, /apps/db/**, allow
";

pub struct HeraldBuilder {
    log: String,
    transport: Transport,
    env: Vec<(String, String)>,
    policy: String,
    config: String,
    args: Vec<String>,
    ports: Option<(u16, u16)>,
    open_files: Option<u64>,
}

impl Default for HeraldBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeraldBuilder {
    pub fn new() -> Self {
        let shipped = std::fs::read_to_string(repo_path("policies/policy.csv"))
            .expect("shipped policy exists");
        Self {
            log: "herald=debug,info".to_owned(),
            transport: Transport::Http1Direct,
            env: Vec::new(),
            policy: format!("{shipped}\n{TEST_POLICY_EXTRA}"),
            config: format!("[auth]\nhs_secret = \"{SECRET}\"\n"),
            args: Vec::new(),
            ports: None,
            open_files: None,
        }
    }

    /// The stream path `subscribe` takes.
    pub fn transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }

    /// herald's log filter (`HERALD_LOG`); benches keep it quiet.
    pub fn log(mut self, filter: &str) -> Self {
        self.log = filter.to_owned();
        self
    }

    /// Sets `HERALD_{key}` (e.g. `STREAM__HEARTBEAT`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((format!("HERALD_{key}"), value.to_owned()));
        self
    }

    /// Replaces the policy text.
    pub fn policy(mut self, csv: &str) -> Self {
        self.policy = csv.to_owned();
        self
    }

    /// Replaces the config file text.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = toml.to_owned();
        self
    }

    /// Listens on these ports instead of ephemeral ones (for restarts behind a load balancer).
    pub fn ports(mut self, public: u16, admin: u16) -> Self {
        self.ports = Some((public, admin));
        self
    }

    /// Runs herald with this open-file limit (soft and hard).
    pub fn open_files(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_owned());
        self
    }

    pub fn start(self) -> Herald {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = repo_path("policies/model.conf");
        let policy = dir.path().join("policy.csv");
        std::fs::write(&policy, &self.policy).expect("write policy");
        let cfg = dir.path().join("herald.toml");
        std::fs::write(
            &cfg,
            format!(
                "{}\n[policy]\nmodel = {:?}\npolicy = {:?}\n",
                self.config,
                model.display().to_string(),
                policy.display().to_string()
            ),
        )
        .expect("write config");
        let log = dir.path().join("herald.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.current_dir(dir.path())
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .args({
                let (p, a) = self.ports.unwrap_or((0, 0));
                [
                    "--listen".to_owned(),
                    format!("127.0.0.1:{p}"),
                    "--admin-listen".to_owned(),
                    format!("127.0.0.1:{a}"),
                ]
            })
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        // Hermetic: nothing from the developer's HERALD_* environment leaks in.
        for (k, _) in std::env::vars() {
            if k.starts_with("HERALD_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("HERALD_LOG", &self.log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn herald");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && line.starts_with("herald ready ") {
                    let _ = tx.send(line);
                    sent = true;
                }
            }
        });
        let line = match rx.recv_timeout(WAIT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "herald did not become ready; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse().ok())
                .expect("ready line names the addresses")
        };
        Herald {
            public: addr("public="),
            admin: addr("admin="),
            infisical: line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("infisical="))
                .and_then(|a| a.parse().ok()),
            webhook: line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("webhook="))
                .and_then(|a| a.parse().ok()),
            policy_path: policy,
            child: Some(child),
            log,
            _dir: dir,
            http: reqwest::Client::new(),
            transport: self.transport,
            streams: self.transport.client(),
        }
    }
}

pub struct Herald {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// The Infisical-dialect listener, when `server.infisical_listen` is set.
    pub infisical: Option<SocketAddr>,
    /// The webhook receiver, when `ingest.webhook.listen` is set.
    pub webhook: Option<SocketAddr>,
    /// The policy file this instance watches.
    pub policy_path: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
    /// For everything but streams.
    pub http: reqwest::Client,
    /// The stream path subscribes take.
    pub transport: Transport,
    streams: reqwest::Client,
}

impl Herald {
    pub fn start() -> Herald {
        HeraldBuilder::new().start()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// POSTs a subscribe request on this instance's transport.
    pub async fn subscribe_raw(&self, token: Option<&str>, body: &Value) -> reqwest::Response {
        self.subscribe_with(token, body, &[]).await
    }

    /// POSTs a subscribe request with extra headers, on this instance's
    /// transport, and checks that a stream took that path.
    pub async fn subscribe_with(
        &self,
        token: Option<&str>,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        self.on_transport(|c| {
            let mut r = c.post(self.url(SUBSCRIBE)).json(body);
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r
        })
        .await
    }

    /// A GET of `path_and_query` (a browser's EventSource) on this
    /// instance's transport.
    pub async fn get_stream(&self, path_and_query: &str) -> reqwest::Response {
        self.on_transport(|c| c.get(self.url(path_and_query))).await
    }

    /// Sends `make`'s request on this instance's stream path, and checks
    /// that a stream took it.
    async fn on_transport(
        &self,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> reqwest::Response {
        let send = || make(&self.streams).send();
        for _ in 0..20 {
            if self.transport == Transport::Http1Hyper {
                // Another request first, read whole, leaves the connection
                // idle in the pool for the subscribe to reuse.
                let warm = self
                    .streams
                    .get(self.url("/nope"))
                    .send()
                    .await
                    .expect("request");
                let _ = warm.bytes().await;
            }
            let r = send().await.expect("subscribe request");
            let direct = r.headers().get("connection").is_some_and(|v| v == "close");
            let on_path = match self.transport {
                Transport::Http1Direct => r.status() != 200 || direct,
                // The pool may have opened a fresh connection after all: again.
                Transport::Http1Hyper => r.status() != 200 || !direct,
                Transport::H2c => r.version() == reqwest::Version::HTTP_2,
            };
            if on_path {
                return r;
            }
        }
        panic!("a subscribe never took the {:?} path", self.transport);
    }

    /// Subscribes and returns the open stream (asserts 200 and the SSE headers).
    pub async fn subscribe(&self, token: &str, body: &Value) -> SseClient {
        let resp = self.subscribe_raw(Some(token), body).await;
        SseClient::open(resp).await
    }

    /// Publishes one event or an array (asserts nothing).
    pub async fn publish_raw(&self, token: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(PUBLISH))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("publish request")
    }

    /// Publishes and asserts 202; returns the response body.
    pub async fn publish(&self, token: &str, body: &Value) -> Value {
        let resp = self.publish_raw(token, body).await;
        let status = resp.status();
        let v: Value = resp.json().await.expect("publish answer is JSON");
        assert_eq!(status, 202, "publish refused: {v}");
        v
    }

    pub async fn admin_json(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.admin_url(path))
            .send()
            .await
            .expect("admin request");
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one metric series line (`name{labels}`), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `series` reaches `value`.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        eventually(WAIT, format!("{series} never reached {value}"), || async {
            (self.metric(series).await == value).then_some(())
        })
        .await
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_ready(&self, status: u16) {
        self.wait_ready_within(status, WAIT).await
    }

    /// Waits until `/readyz` answers `status`, up to `within`.
    pub async fn wait_ready_within(&self, status: u16, within: Duration) {
        eventually(
            within,
            format!("/readyz never answered {status}"),
            || async { (self.admin_json("/readyz").await.0 == status).then_some(()) },
        )
        .await
    }

    /// The NATS subjects this instance is subscribed to (`/admin/nats`).
    pub async fn nats_subjects(&self) -> Vec<String> {
        let (_, v) = self.admin_json("/admin/nats").await;
        v["subscriptions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    }

    /// Sends a signal by name (`TERM`, `HUP`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Waits until `/admin/policy` satisfies `pred`, returning it.
    pub async fn wait_policy(&self, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(WAIT, "the policy state never matched", || async {
            let (_, v) = self.admin_json("/admin/policy").await;
            pred(&v).then_some(v)
        })
        .await
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = &mut self.child;
        eventually(within, "herald did not exit", || {
            let status = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            async move { status }
        })
        .await
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- herald log (last 40 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A test event envelope.
pub fn event(ty: &str, project: &str, env: &str, path: &str) -> Value {
    json!({
        "specversion": "1.0", "source": "/test", "type": ty,
        "projectid": project, "environment": env, "secretpath": path,
        "data": {"secretKeys": ["KEY"]}
    })
}

/// A subscribe body with one registration.
pub fn registration(project: &str, ty: &str, env: Option<&str>, path: Option<&str>) -> Value {
    let mut cond = serde_json::Map::new();
    if let Some(e) = env {
        cond.insert("environmentSlug".into(), e.into());
    }
    if let Some(p) = path {
        cond.insert("secretPath".into(), p.into());
    }
    json!({"projectId": project, "register": [{"event": ty, "conditions": cond}]})
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A minimal, strict SSE client over a real HTTP response.
pub struct SseClient {
    stream: ByteStream,
    parser: Parser,
    pub ended: bool,
    pub headers: reqwest::header::HeaderMap,
}

impl SseClient {
    pub async fn open(resp: reqwest::Response) -> SseClient {
        let status = resp.status();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            panic!("expected a stream, got {status}: {body}");
        }
        let headers = resp.headers().clone();
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        assert_eq!(
            headers.get("cache-control").and_then(|v| v.to_str().ok()),
            Some("no-cache")
        );
        assert_eq!(
            headers
                .get("x-accel-buffering")
                .and_then(|v| v.to_str().ok()),
            Some("no")
        );
        SseClient {
            stream: Box::pin(resp.bytes_stream()),
            parser: Parser::strict(),
            ended: false,
            headers,
        }
    }

    /// The next message or comment (`Ok(None)` when the stream ended), or
    /// `Err` on silence for `within`.
    async fn next_or_silence(&mut self, within: Duration) -> Result<Option<SseEvent>, ()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(ev) = self.parser.next() {
                return Ok(Some(ev));
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Err(()),
                Ok(Some(Ok(b))) => self.parser.push(&b),
                Ok(Some(Err(_))) | Ok(None) => self.ended = true,
            }
        }
    }

    /// The next message or comment; `None` when the stream ended. Panics after `within`.
    pub async fn next_raw(&mut self, within: Duration) -> Option<SseEvent> {
        match self.next_or_silence(within).await {
            Ok(ev) => ev,
            Err(()) => panic!("no SSE message within {within:?}"),
        }
    }

    /// The next message or comment, if one arrives within `within` (`None`
    /// on silence or at the end of the stream).
    pub async fn next_within(&mut self, within: Duration) -> Option<SseEvent> {
        self.next_or_silence(within).await.unwrap_or(None)
    }

    /// The next real message (skips comments and bare `retry:` hints).
    pub async fn next_event(&mut self) -> SseEvent {
        loop {
            match self.next_raw(WAIT).await {
                None => panic!("stream ended while waiting for an event"),
                Some(ev) if ev.is_meta() => continue,
                Some(ev) => return ev,
            }
        }
    }

    /// Reads up to the first event at `sentinel_path` (consumed) and returns
    /// the events before it. An `error` event on the way fails the test.
    pub async fn events_until(&mut self, sentinel_path: &str) -> Vec<SseEvent> {
        let mut seen = Vec::new();
        loop {
            let ev = self.next_event().await;
            assert_ne!(ev.event.as_deref(), Some("error"), "{}", ev.data);
            if ev.json()["secretpath"].as_str() == Some(sentinel_path) {
                return seen;
            }
            seen.push(ev);
        }
    }

    /// The secret paths of [`events_until`](Self::events_until).
    pub async fn paths_until(&mut self, sentinel_path: &str) -> Vec<String> {
        let events = self.events_until(sentinel_path).await;
        events
            .iter()
            .map(|e| {
                e.json()["secretpath"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    /// Waits for the end of the stream, returning messages seen on the way.
    pub async fn until_end(&mut self) -> Vec<SseEvent> {
        let mut seen = Vec::new();
        while let Some(ev) = self.next_raw(WAIT).await {
            if !ev.comment {
                seen.push(ev);
            }
        }
        seen
    }
}
