//! Infisical's internal Redis pub/sub bus, subscribed: the channel its
//! server containers tell each other about secret changes on
//! (`infisical::core-servers`). The message shape is Infisical's internal
//! one and has changed across versions: [`decode`] accepts the shapes read
//! in its source (README names the versions), and counts and drops
//! anything else by reason; nothing a publisher sends can stop the
//! subscriber. Redis pub/sub keeps nothing while herald is not listening:
//! when the subscription comes back after being down, every open stream is
//! told `gap`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{Ingest, SourceId};
use crate::event::Event;
use crate::setting::{self, Invalid, Secret};

/// `[ingest.redis]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Infisical's Redis (`redis://host:6379`, `rediss://` for TLS; off
    /// when unset). A password here is redacted in `config print`; or set
    /// `password`.
    pub url: Option<Secret>,
    /// The password, when not in the URL.
    pub password: Option<Secret>,
    /// The channel.
    pub channel: String,
    /// Largest message taken.
    pub max_message_bytes: usize,
    /// The longest wait between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How often a subscription that hears nothing is checked (`PING`), so
    /// that a connection that died without a reset is noticed.
    #[serde(with = "humantime_serde")]
    pub ping_every: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            password: None,
            channel: "infisical::core-servers".into(),
            max_message_bytes: 256 * 1024,
            max_backoff: Duration::from_secs(30),
            ping_every: Duration::from_secs(15),
        }
    }
}

impl RedisConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        let Some(url) = &self.url else {
            return Ok(());
        };
        if let Err(e) = redis::Client::open(url.expose()) {
            return Err(setting::invalid(
                "ingest.redis.url",
                format!("not a Redis URL (redis:// or rediss://): {:?}", e.kind()),
            ));
        }
        if self.channel.is_empty() {
            return Err(setting::invalid(
                "ingest.redis.channel",
                "must not be empty",
            ));
        }
        setting::at_least(
            "ingest.redis.max_message_bytes",
            self.max_message_bytes,
            1024,
        )?;
        setting::duration(
            "ingest.redis.ping_every",
            self.ping_every,
            Duration::from_millis(50),
            Duration::from_secs(3600),
        )?;
        setting::duration(
            "ingest.redis.max_backoff",
            self.max_backoff,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )
    }
}

/// Why a message was dropped (the `reason` of the dropped counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Larger than `max_message_bytes`.
    TooLarge,
    /// Not JSON.
    Malformed,
    /// A message of the bus that is not about secrets (counted, ignored).
    Unrelated,
    /// About secrets, in a shape herald does not know.
    UnknownShape,
    /// An older shape, which names no project (it cannot be routed).
    NoProject,
    /// Its project, environment, path or keys are not ones herald takes.
    BadEvent,
}

impl Drop {
    /// The label.
    pub fn label(self) -> &'static str {
        match self {
            Drop::TooLarge => "too_large",
            Drop::Malformed => "malformed",
            Drop::Unrelated => "unrelated",
            Drop::UnknownShape => "unknown_shape",
            Drop::NoProject => "no_project",
            Drop::BadEvent => "bad_event",
        }
    }

    /// Every label.
    pub const LABELS: &'static [&'static str] = &[
        "too_large",
        "malformed",
        "unrelated",
        "unknown_shape",
        "no_project",
        "bad_event",
        "bus_unavailable",
        "overflow",
        "lost",
    ];
}

/// herald's event type for Infisical's.
fn event_type(infisical: &str) -> Option<&'static str> {
    Some(match infisical {
        "secret:create" | "secret:created" => "secret:created",
        "secret:update" | "secret:updated" => "secret:updated",
        "secret:delete" | "secret:deleted" => "secret:deleted",
        "secret:import-mutation" => "secret:import-mutation",
        _ => return None,
    })
}

/// The events one bus message announces.
pub fn decode(raw: &[u8], max_bytes: usize, max_event_bytes: usize) -> Result<Vec<Event>, Drop> {
    if raw.len() > max_bytes {
        return Err(Drop::TooLarge);
    }
    let v: Value = serde_json::from_slice(raw).map_err(|_| Drop::Malformed)?;
    let Some(m) = v.as_object() else {
        return Err(Drop::Malformed);
    };
    let payloads = shapes(m)?;
    // One message, one id: every instance that hears it publishes the same.
    // Only when the message carries its time: without it, two changes could
    // have the same bytes, and a repeat is better than a loss.
    let id: String = if m.get("timestamp").is_some_and(Value::is_string) {
        Sha256::digest(raw)[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    } else {
        uuid::Uuid::new_v4().simple().to_string()
    };
    let mut out = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.into_iter().enumerate() {
        let event = |keys: &[&str]| {
            let e = json!({
                "specversion": "1.0",
                "id": format!("infisical-redis-{id}-{i}"),
                "source": "/infisical/redis",
                "type": p.ty,
                "projectid": p.project,
                "environment": p.env,
                "secretpath": p.path,
                "data": {"secretKeys": keys},
            });
            Event::from_json(e, max_event_bytes)
        };
        // Too many names for one event: the change without them.
        let e = event(&p.keys)
            .or_else(|_| event(&[]))
            .map_err(|_| Drop::BadEvent)?;
        out.push(e);
    }
    Ok(out)
}

/// One change, as read from a message.
struct Change<'a> {
    ty: &'static str,
    project: &'a str,
    env: &'a str,
    path: &'a str,
    keys: Vec<&'a str>,
}

/// The changes of the shapes known, read in Infisical's source
/// (`backend/src/ee/services/event-bus/`, `project-events/`; README says
/// which):
///
/// - the envelope `{"type", "timestamp", "sourceContainer", "payload"}`
///   whose `payload` is `{"type": "secret:create|update|delete|import-mutation",
///   "projectId", "environment", "secretPath", "secretKeys": [..]}` (or a
///   single `"secretKey"`, or no key for import-mutation);
/// - the same envelope whose own `type` names the change
///   (`secret.created` …) and whose payload has no `type`.
///
/// The older CloudEvent-like shape (`data.event` or `data.eventType`,
/// `data.payload`) carries no project id: it is recognised and dropped
/// (`no_project`), since an event cannot be routed without one.
fn str_of(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str)
}

fn shapes(m: &serde_json::Map<String, Value>) -> Result<Vec<Change<'_>>, Drop> {
    if let (Some(payload), Some(_)) = (m.get("payload"), str_of(m.get("sourceContainer"))) {
        let Some(p) = payload.as_object() else {
            return Err(Drop::UnknownShape);
        };
        let ty = match str_of(p.get("type")) {
            Some(t) => t,
            None => match str_of(m.get("type")) {
                Some("secret.created") => "secret:create",
                Some("secret.updated") => "secret:update",
                Some("secret.deleted") => "secret:delete",
                Some("secret.import-mutation") => "secret:import-mutation",
                _ => return Err(Drop::Unrelated),
            },
        };
        let Some(ty) = event_type(ty) else {
            return Err(Drop::Unrelated);
        };
        let (Some(project), Some(env)) = (str_of(p.get("projectId")), str_of(p.get("environment")))
        else {
            return Err(Drop::UnknownShape);
        };
        let path = match p.get("secretPath") {
            None | Some(Value::Null) => "/",
            Some(Value::String(s)) if s.is_empty() => "/",
            Some(Value::String(s)) => s,
            Some(_) => return Err(Drop::UnknownShape),
        };
        let keys = match (p.get("secretKeys"), p.get("secretKey")) {
            (Some(Value::Array(a)), _) => a
                .iter()
                .map(Value::as_str)
                .collect::<Option<Vec<_>>>()
                .ok_or(Drop::UnknownShape)?,
            (Some(_), _) => return Err(Drop::UnknownShape),
            (None, Some(Value::String(k))) => vec![k.as_str()],
            (None, Some(_)) => return Err(Drop::UnknownShape),
            (None, None) => Vec::new(),
        };
        return Ok(vec![Change {
            ty,
            project,
            env,
            path,
            keys,
        }]);
    }
    if let Some(data) = m.get("data").and_then(Value::as_object) {
        if data.contains_key("payload")
            && (data.contains_key("event") || data.contains_key("eventType"))
        {
            return Err(Drop::NoProject);
        }
    }
    Err(Drop::UnknownShape)
}

/// Messages waiting to be published; beyond it they are dropped and
/// streams told `gap` (the bus is slower than Redis).
const QUEUE: usize = 1024;

/// How long one event's publish is retried (its id is derived from the
/// message: a retry is stored once) before it counts as lost.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(30);

/// A session that lasted this long resets the backoff.
const HEALTHY: Duration = Duration::from_secs(30);

/// Subscribes to the channel until `stop`; reconnects with backoff.
/// Messages are read into a bounded queue and published in order by a
/// task of their own, so a slow bus never stops the reading.
pub async fn run(
    cfg: RedisConfig,
    ingest: Arc<Ingest>,
    max_event_bytes: usize,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let Some(url) = cfg.url.clone() else { return };
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(QUEUE);
    let publisher = tokio::spawn(publish_all(
        rx,
        ingest.clone(),
        cfg.max_message_bytes,
        max_event_bytes,
    ));
    let _abort = AbortOnDrop(publisher);
    let mut backoff = Duration::from_millis(200).min(cfg.max_backoff);
    let mut was_down = false;
    loop {
        let session = async {
            let mut info = redis::Client::open(url.expose())?
                .get_connection_info()
                .clone();
            if let Some(p) = &cfg.password {
                info.redis.password = Some(p.expose().to_owned());
            }
            let client = redis::Client::open(info)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&cfg.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let subscribed = tokio::select! {
            _ = &mut stop => return,
            s = tokio::time::timeout(Duration::from_secs(10), session) => s,
        };
        let started = tokio::time::Instant::now();
        match subscribed {
            Ok(Ok(pubsub)) => {
                ingest.connected(SourceId::Redis, true, None);
                tracing::info!(channel = %cfg.channel, "subscribed to Infisical's Redis bus");
                if was_down {
                    // Whatever was published meanwhile is gone.
                    ingest.tell_gap();
                }
                let why = tokio::select! {
                    _ = &mut stop => return,
                    why = listen(pubsub, &tx, &ingest, cfg.ping_every) => why,
                };
                tracing::warn!(reason = %why, "the Redis subscription ended; reconnecting");
                ingest.connected(SourceId::Redis, false, Some(why));
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "Redis did not answer in time".to_owned(),
                };
                tracing::warn!(error = %why, "cannot subscribe to Infisical's Redis bus; retrying");
                ingest.connected(SourceId::Redis, false, Some(why));
            }
        }
        was_down = true;
        if started.elapsed() >= HEALTHY {
            backoff = Duration::from_millis(200).min(cfg.max_backoff);
        }
        let quarter = u64::try_from(backoff.as_millis() / 4).unwrap_or(0);
        let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=quarter);
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
        }
        backoff = (backoff * 2).min(cfg.max_backoff);
    }
}

/// Reads one subscription into `queue` until it ends; says why.
async fn listen(
    pubsub: redis::aio::PubSub,
    queue: &tokio::sync::mpsc::Sender<Vec<u8>>,
    ingest: &Ingest,
    every: Duration,
) -> String {
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            m = messages.next() => {
                let Some(m) = m else {
                    return "the connection closed".into();
                };
                ingest.received(SourceId::Redis);
                if queue.try_send(m.get_payload_bytes().to_vec()).is_err() {
                    // The bus is slower than Redis: this one is lost.
                    ingest.dropped(SourceId::Redis, "overflow");
                    ingest.tell_gap();
                }
            }
            _ = ping.tick() => {
                let pong = tokio::time::timeout(Duration::from_secs(5), sink.ping::<redis::Value>());
                if !matches!(pong.await, Ok(Ok(_))) {
                    return "Redis did not answer a PING".into();
                }
            }
        }
    }
}

/// Publishes queued messages in order; an event the bus does not take is
/// retried (its id makes a retry stored once) for [`PUBLISH_PATIENCE`],
/// then counted lost and streams are told `gap`.
async fn publish_all(
    mut queue: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ingest: Arc<Ingest>,
    max_bytes: usize,
    max_event_bytes: usize,
) {
    while let Some(raw) = queue.recv().await {
        let events = match decode(&raw, max_bytes, max_event_bytes) {
            Ok(e) => e,
            Err(d) => {
                ingest.dropped(SourceId::Redis, d.label());
                continue;
            }
        };
        for e in events {
            let give_up = tokio::time::Instant::now() + PUBLISH_PATIENCE;
            let mut wait = Duration::from_millis(100);
            loop {
                if ingest.publish(SourceId::Redis, e.clone()).await.is_ok() {
                    break;
                }
                if tokio::time::Instant::now() + wait > give_up {
                    ingest.dropped(SourceId::Redis, "lost");
                    ingest.tell_gap();
                    break;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl std::ops::Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(raw: &str) -> Result<Vec<Event>, Drop> {
        decode(raw.as_bytes(), 256 * 1024, 1 << 20)
    }

    #[test]
    fn the_shapes_read_in_infisicals_source_become_events() {
        let current = r#"{"type":"project-events","timestamp":"2025-01-01T00:00:00.000Z","sourceContainer":"container-abc","payload":{"type":"secret:create","environment":"dev","secretPath":"/","projectId":"p1","secretKeys":["DB_URL","DB_USER"]}}"#;
        let e = one(current).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key.event_type.name(), "secret:created");
        assert_eq!(e[0].key.project.as_str(), "p1");
        assert_eq!(
            &*e[0].secret_keys,
            &["DB_URL".into(), "DB_USER".into()] as &[Box<str>]
        );
        assert_eq!(e[0].id, one(current).unwrap()[0].id, "one message, one id");
        let import = r#"{"type":"x","timestamp":"t","sourceContainer":"c","payload":{"type":"secret:import-mutation","projectId":"p1","secretPath":"/app","environment":"prod"}}"#;
        let e = one(import).unwrap();
        assert_eq!(e[0].key.event_type.name(), "secret:import-mutation");
        assert!(e[0].secret_keys.is_empty());
        let single = r#"{"type":"secret.mutation","timestamp":"t","sourceContainer":"c","payload":{"type":"secret:update","projectId":"p1","environment":"prod","secretPath":"/a","secretKey":"K"}}"#;
        assert_eq!(
            &*one(single).unwrap()[0].secret_keys,
            &["K".into()] as &[Box<str>]
        );
        let by_envelope = r#"{"type":"secret.deleted","timestamp":"t","sourceContainer":"c","payload":{"projectId":"p1","environment":"prod","secretPath":"/a"}}"#;
        assert_eq!(
            one(by_envelope).unwrap()[0].key.event_type.name(),
            "secret:deleted"
        );
    }

    #[test]
    fn anything_else_is_dropped_by_reason() {
        let legacy = r#"{"type":"secret-manager","source":"x","data":{"event":"secret:update","payload":[{"secretId":"s","secretKey":"K","secretPath":"/","environment":"dev"}]}}"#;
        for (raw, why) in [
            ("", Drop::Malformed),
            ("[1]", Drop::Malformed),
            ("{\"a\":", Drop::Malformed),
            (legacy, Drop::NoProject),
            (
                r#"{"data":{"eventType":"update-secret","payload":{}}}"#,
                Drop::NoProject,
            ),
            (r#"{"hello":"world"}"#, Drop::UnknownShape),
            (
                r#"{"type":"other","timestamp":"t","sourceContainer":"c","payload":{"type":"user:login"}}"#,
                Drop::Unrelated,
            ),
            (
                r#"{"type":"other","timestamp":"t","sourceContainer":"c","payload":{}}"#,
                Drop::Unrelated,
            ),
            (
                r#"{"type":"x","timestamp":"t","sourceContainer":"c","payload":[]}"#,
                Drop::UnknownShape,
            ),
            (
                r#"{"type":"x","timestamp":"t","sourceContainer":"c","payload":{"type":"secret:update","environment":"prod"}}"#,
                Drop::UnknownShape,
            ),
            (
                r#"{"type":"x","timestamp":"t","sourceContainer":"c","payload":{"type":"secret:update","projectId":"p1","environment":"prod","secretKeys":[1]}}"#,
                Drop::UnknownShape,
            ),
            (
                r#"{"type":"x","timestamp":"t","sourceContainer":"c","payload":{"type":"secret:update","projectId":"p1","environment":"prod","secretPath":7}}"#,
                Drop::UnknownShape,
            ),
            (
                r#"{"type":"x","timestamp":"t","sourceContainer":"c","payload":{"type":"secret:update","projectId":"p 1","environment":"prod"}}"#,
                Drop::BadEvent,
            ),
        ] {
            assert_eq!(one(raw).unwrap_err(), why, "{raw}");
        }
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(300 * 1024));
        assert_eq!(one(&big).unwrap_err(), Drop::TooLarge);
        // Deep nesting is refused by the JSON parser's depth limit, not a crash.
        let deep = "[".repeat(100_000);
        assert_eq!(
            one(&deep[..200_000.min(deep.len())]).unwrap_err(),
            Drop::Malformed
        );
    }
}
