//! Infisical's two clients, ported from their sources (`../shared/infisical.md`):
//! what they send to subscribe, the Kubernetes operator's line parser (a
//! frame is dispatched only with an `event:` line; only `event: ping` counts
//! as liveness; a line of 64 KiB or more is a read error) and the CLI
//! proxy's decoding of a frame's `data` into its payload struct.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::WAIT;

pub const EVENTS: [&str; 4] = [
    "secret:create",
    "secret:update",
    "secret:delete",
    "secret:import-mutation",
];

/// What the operator sends for one resource (its headers and body).
pub fn operator_body(path: &str) -> Value {
    let conditions = json!({"secretPath": path, "environmentSlug": "prod"});
    let register: Vec<Value> = EVENTS
        .iter()
        .map(|e| json!({"event": e, "conditions": conditions}))
        .collect();
    json!({"projectId": "p1", "register": register})
}

/// What the CLI proxy sends: one stream per project, no conditions.
pub fn cli_body() -> Value {
    let register: Vec<Value> = EVENTS.iter().map(|e| json!({"event": e})).collect();
    json!({"projectId": "p1", "register": register})
}

/// What both clients send, to `url`.
pub async fn open_at(url: &str, token: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .header("connection", "keep-alive")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// One event as the operator dispatches it.
#[derive(Debug, Clone)]
pub struct Dispatched {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// The operator's reading of a stream: `field:value` lines (one leading
/// space dropped), `data` joined with `\n`, a frame dispatched only when it
/// has an `event:` line (the data of one without stays pending).
pub struct Operator {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
    event: Option<String>,
    id: Option<String>,
    data: Vec<String>,
    pub pings: usize,
    pub lines: Vec<String>,
    /// The stream ended (not a read time-out).
    pub ended: bool,
    /// Its scanner failed (a line of 64 KiB or more): the operator
    /// reconnects after 1 s. Any other end leaves it blind until its
    /// 2-minute watchdog.
    pub read_error: bool,
}

/// The operator's (and the CLI's) `bufio.Scanner` buffer: a line that does
/// not fit (with its newline) is a read error.
const SCANNER_MAX: usize = 64 * 1024;

impl Operator {
    pub fn new(resp: reqwest::Response) -> Operator {
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Operator {
            body: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            event: None,
            id: None,
            data: Vec::new(),
            pings: 0,
            lines: Vec::new(),
            ended: false,
            read_error: false,
        }
    }

    /// The next dispatched event other than `ping` (pings are counted).
    pub async fn next(&mut self) -> Option<Dispatched> {
        self.next_within(WAIT).await
    }

    /// [`next`](Self::next), waiting at most `within` for each read.
    pub async fn next_within(&mut self, within: Duration) -> Option<Dispatched> {
        loop {
            if self.read_error {
                return None;
            }
            loop {
                let nl = self.buf.iter().position(|b| *b == b'\n');
                let too_long = match nl {
                    Some(n) => n + 1 > SCANNER_MAX,
                    None => self.buf.len() >= SCANNER_MAX,
                };
                if too_long {
                    // bufio.Scanner: token too long.
                    self.read_error = true;
                    self.ended = true;
                    return None;
                }
                let Some(nl) = nl else { break };
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let line = String::from_utf8(line[..line.len() - 1].to_vec()).unwrap();
                self.lines.push(line.clone());
                if line.is_empty() {
                    let Some(event) = self.event.take() else {
                        continue; // no event: line: the data waits for the next one
                    };
                    let d = Dispatched {
                        event,
                        id: self.id.clone(),
                        data: std::mem::take(&mut self.data).join("\n"),
                    };
                    if d.event == "ping" {
                        self.pings += 1;
                        continue;
                    }
                    return Some(d);
                }
                let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
                let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                match field {
                    "event" => self.event = Some(value),
                    "id" => self.id = Some(value),
                    "data" => self.data.push(value),
                    _ => {}
                }
            }
            match tokio::time::timeout(within, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(_) => {
                    self.ended = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }
}

/// The CLI proxy's payload struct, as it decodes a frame's joined data.
pub fn cli_decode(d: &Dispatched) -> Option<(String, Value)> {
    let joined: String = d.data.lines().map(str::trim).collect();
    let v: Value = serde_json::from_str(&joined).ok()?;
    let data = v.get("data")?;
    Some((
        data.get("eventType")?.as_str()?.to_owned(),
        data.get("payload")?.clone(),
    ))
}

/// The ids and secret paths of the events an operator reads until `n`
/// events have come (or nothing more comes).
pub async fn read_paths(op: &mut Operator, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let Some(d) = op.next().await else { break };
        let path = match cli_decode(&d) {
            Some((_, payload)) => payload[0]["secretPath"].as_str().unwrap_or("").to_owned(),
            None => String::new(),
        };
        out.push((d.event, path));
    }
    out
}

/// Infisical's deployment in front of herald (docker/infisical-proxy.cfg):
/// `n` instances on `nats` with replay and the Infisical listener (and
/// `extra` settings), a stand-in for Infisical, haproxy splitting paths.
pub struct Deployment {
    pub heralds: Vec<super::Herald>,
    pub proxy: super::haproxy::Haproxy,
    _infisical: super::idp::Idp,
}

impl Deployment {
    pub async fn start(nats: &super::nats::NatsServer, n: usize, extra: &[(&str, &str)]) -> Self {
        let heralds: Vec<super::Herald> = (0..n)
            .map(|_| {
                let mut b = super::HeraldBuilder::new()
                    .env("NATS__URLS", &super::nats::urls_env(&[nats.url()]))
                    .env("NATS__PRESENCE_INTERVAL", "200ms")
                    .env("REPLAY__ENABLED", "true")
                    .env("SERVER__INFISICAL_LISTEN", "127.0.0.1:0");
                for (k, v) in extra {
                    b = b.env(k, v);
                }
                b.start()
            })
            .collect();
        for h in &heralds {
            h.wait_ready(200).await;
        }
        let infisical = super::idp::Idp::start(json!({"keys": []})).await;
        let backends: Vec<(u16, u16)> = heralds
            .iter()
            .map(|h| {
                (
                    h.infisical.expect("an infisical listener").port(),
                    h.admin.port(),
                )
            })
            .collect();
        let proxy =
            super::haproxy::Haproxy::start_infisical(&backends, infisical.addr.port()).await;
        Deployment {
            heralds,
            proxy,
            _infisical: infisical,
        }
    }
}
