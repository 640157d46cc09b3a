//! Infisical's project webhooks, received: `POST` with the body
//! `{"event":"secrets.modified","project":{"projectId","environment",
//! "secretPath",…},"timestamp":<ms>}` and the header
//! `x-infisical-signature: t=<ms>;<hex HMAC-SHA256 of the body>`, computed
//! by Infisical (`backend/src/services/webhook/webhook-fns.ts`) over
//! `JSON.stringify(payload)`, which is the body it sends.
//!
//! A delivery is taken when its signature matches one of the configured
//! secrets (several, so that a secret can be rotated; compared in constant
//! time), its signed `timestamp` is the header's and within `max_skew` of
//! now, and the same (timestamp, signature) was not taken before (a
//! replayed delivery is answered but published once). It becomes one
//! `secret:updated` event for the project, environment and path (webhooks
//! carry no key names), with an id derived from the signature, so that
//! instances behind a load balancer store it once in JetStream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{Ingest, SourceId};
use crate::event::Event;
use crate::setting::{self, Invalid, Secret};

/// The header Infisical signs with.
pub const SIGNATURE_HEADER: &str = "x-infisical-signature";

/// `[ingest.webhook]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Where the receiver listens (off when unset). Keep it on a network
    /// Infisical reaches and clients do not.
    pub listen: Option<SocketAddr>,
    /// The path Infisical posts to.
    pub path: String,
    /// Secret keys valid for any project; a delivery signed with any of
    /// them is taken.
    pub secrets: Vec<Secret>,
    /// Secret keys valid for one project each (`projectId` = keys): a
    /// project's admin, who sets its webhook's key in Infisical, cannot
    /// sign for another project.
    pub project_secrets: std::collections::BTreeMap<String, Vec<Secret>>,
    /// How far a delivery's timestamp may be from now.
    #[serde(with = "humantime_serde")]
    pub max_skew: Duration,
    /// Largest body taken.
    pub max_body_bytes: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            listen: None,
            path: "/api/v1/ingest/infisical/webhook".into(),
            secrets: Vec::new(),
            project_secrets: Default::default(),
            max_skew: Duration::from_secs(60),
            max_body_bytes: 64 * 1024,
        }
    }
}

impl WebhookConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.listen.is_none() {
            return Ok(());
        }
        let all = || {
            self.secrets
                .iter()
                .chain(self.project_secrets.values().flatten())
        };
        if all().next().is_none() || all().any(|s| s.expose().len() < 16) {
            return Err(setting::invalid(
                "ingest.webhook.secrets",
                "the receiver needs the webhooks' secret keys, in secrets or project_secrets (at least 16 characters each; set the same key on the webhook in Infisical)",
            ));
        }
        if !self.path.starts_with('/') || self.path.len() > 256 {
            return Err(setting::invalid(
                "ingest.webhook.path",
                "a path starting with /",
            ));
        }
        setting::duration(
            "ingest.webhook.max_skew",
            self.max_skew,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        setting::at_least("ingest.webhook.max_body_bytes", self.max_body_bytes, 256)
    }
}

/// Why a delivery was refused (the `reason` of the dropped counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No signature header (the webhook has no secret key in Infisical).
    Unsigned,
    /// The header is not `t=<ms>;<64 hex>`.
    MalformedSignature,
    /// No configured secret signs this body.
    BadSignature,
    /// The signed timestamp is too far from now, or not the header's.
    Stale,
    /// The body is not Infisical's webhook JSON.
    MalformedBody,
    /// The body is larger than `max_body_bytes`, or was not sent in time.
    Body,
    /// An event herald does not take (`secrets.rotation-failed`).
    UnsupportedEvent,
    /// Its project, environment or path is not one herald takes.
    BadEvent,
    /// Signed with a key of another project.
    WrongProject,
    /// Too many deliveries within the skew window to remember them.
    Busy,
}

impl Refusal {
    /// The label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::MalformedSignature => "malformed_signature",
            Refusal::BadSignature => "bad_signature",
            Refusal::Stale => "stale",
            Refusal::MalformedBody => "malformed",
            Refusal::Body => "body",
            Refusal::UnsupportedEvent => "unsupported_event",
            Refusal::BadEvent => "bad_event",
            Refusal::WrongProject => "wrong_project",
            Refusal::Busy => "busy",
        }
    }

    /// Every label.
    pub const LABELS: &'static [&'static str] = &[
        "unsigned",
        "malformed_signature",
        "bad_signature",
        "stale",
        "malformed",
        "body",
        "unsupported_event",
        "bad_event",
        "wrong_project",
        "busy",
        "bus_unavailable",
    ];

    /// What the answer says.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned delivery: set a secret key on the webhook in Infisical and in ingest.webhook.secrets",
            Refusal::MalformedSignature => "the x-infisical-signature header is not t=<ms>;<hex>",
            Refusal::BadSignature => "the signature does not match any configured secret",
            Refusal::Stale => "the delivery's timestamp is too far from now (ingest.webhook.max_skew)",
            Refusal::MalformedBody => "the body is not an Infisical webhook",
            Refusal::Body => "the body is too large or was not sent in time",
            Refusal::UnsupportedEvent => "this event is not taken; nothing was published",
            Refusal::BadEvent => "the project, environment or path is not one herald takes",
            Refusal::WrongProject => {
                "this key signs for another project (ingest.webhook.project_secrets)"
            }
            Refusal::Busy => "too many deliveries at once; try again",
        }
    }
}

/// A parsed `x-infisical-signature`.
#[derive(Debug, PartialEq, Eq)]
pub struct Signature {
    /// `t=`: milliseconds since the epoch.
    pub timestamp: u64,
    /// The HMAC.
    pub mac: [u8; 32],
}

impl Signature {
    /// Parses `t=<ms>;<64 hex>`.
    pub fn parse(header: &[u8]) -> Option<Signature> {
        if header.len() > 128 {
            return None;
        }
        let text = std::str::from_utf8(header).ok()?.trim();
        let (t, hex) = text.strip_prefix("t=")?.split_once(';')?;
        if t.is_empty() || t.len() > 19 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut mac = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            mac[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Some(Signature {
            timestamp: t.parse().ok()?,
            mac,
        })
    }
}

/// Whether one of `secrets` signs `body` with `mac` (constant time each).
pub fn signed_by_any(secrets: &[Secret], body: &[u8], mac: &[u8; 32]) -> bool {
    secrets.iter().any(|s| {
        let Ok(mut m) = Hmac::<Sha256>::new_from_slice(s.expose().as_bytes()) else {
            return false;
        };
        m.update(body);
        m.verify_slice(mac).is_ok()
    })
}

/// Which projects the key that signed a delivery may speak for.
#[derive(Debug, PartialEq, Eq)]
enum Scope<'a> {
    /// A key of `secrets`.
    Any,
    /// Keys of `project_secrets` for these projects.
    Projects(Vec<&'a str>),
}

impl WebhookConfig {
    /// The scope of the keys that sign `body` with `mac`, if any does.
    fn scope(&self, body: &[u8], mac: &[u8; 32]) -> Option<Scope<'_>> {
        if signed_by_any(&self.secrets, body, mac) {
            return Some(Scope::Any);
        }
        let projects: Vec<&str> = self
            .project_secrets
            .iter()
            .filter(|(_, keys)| signed_by_any(keys, body, mac))
            .map(|(p, _)| p.as_str())
            .collect();
        (!projects.is_empty()).then_some(Scope::Projects(projects))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The event a verified body announces (`Ok(None)`: a test delivery).
pub fn event_of(
    body: &[u8],
    signature: &Signature,
    max_event_bytes: usize,
) -> Result<Option<Event>, Refusal> {
    let v: Value = serde_json::from_slice(body).map_err(|_| Refusal::MalformedBody)?;
    if v.get("timestamp").and_then(Value::as_u64) != Some(signature.timestamp) {
        return Err(Refusal::Stale);
    }
    match v.get("event").and_then(Value::as_str) {
        Some("secrets.modified") => {}
        Some("test") => return Ok(None),
        Some(_) => return Err(Refusal::UnsupportedEvent),
        None => return Err(Refusal::MalformedBody),
    }
    let project = v.get("project").ok_or(Refusal::MalformedBody)?;
    let field = |k: &str| project.get(k).and_then(Value::as_str);
    // Older Infisical versions name the project `workspaceId` only.
    let project_id = field("projectId").or_else(|| field("workspaceId"));
    let (Some(project_id), Some(env)) = (project_id, field("environment")) else {
        return Err(Refusal::MalformedBody);
    };
    let path = match project.get("secretPath") {
        None | Some(Value::Null) => "/",
        Some(Value::String(p)) if p.is_empty() => "/",
        Some(Value::String(p)) => p,
        Some(_) => return Err(Refusal::MalformedBody),
    };
    // One delivery, one id: the same delivery posted to two instances is
    // stored once (its body carries Infisical's millisecond timestamp).
    let digest = Sha256::digest(body);
    let id: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let event = json!({
        "specversion": "1.0",
        "id": format!("infisical-webhook-{id}"),
        "source": "/infisical/webhook",
        "type": "secret:updated",
        "projectid": project_id,
        "environment": env,
        "secretpath": path,
        "time": crate::ingest::rfc3339_ms(signature.timestamp),
        "data": {"secretKeys": []},
    });
    Event::from_json(event, max_event_bytes)
        .map(Some)
        .map_err(|_| Refusal::BadEvent)
}

/// Deliveries taken within the skew window, so that a replay is published
/// once. Only verified deliveries enter it.
#[derive(Default)]
struct Seen {
    at: HashMap<[u8; 32], u64>,
}

/// Most deliveries remembered at once (more within the skew window are
/// refused with 503).
const MAX_SEEN: usize = 100_000;

impl Seen {
    /// Whether `s` is new (and now seen).
    /// `Some(true)` when the delivery whose body hashes to `digest` is new
    /// (and now seen), `Some(false)` when it was seen, `None` when too many
    /// deliveries are remembered to take another.
    fn first(&mut self, digest: [u8; 32], timestamp: u64, now: u64, skew: u64) -> Option<bool> {
        if self.at.len() >= MAX_SEEN {
            self.at.retain(|_, t| t.saturating_add(skew) >= now);
            if self.at.len() >= MAX_SEEN {
                return None;
            }
        }
        Some(self.at.insert(digest, timestamp).is_none())
    }
}

/// What became of a verified delivery.
#[derive(Debug)]
pub enum Taken {
    /// Published as this event.
    Published {
        /// Its id.
        id: String,
        /// Its sequence, when the bus assigns one.
        sequence: Option<u64>,
    },
    /// Taken before: not published again.
    Duplicate {
        /// The id it was published as.
        id: String,
    },
    /// Infisical's test delivery: nothing published.
    Test,
    /// The bus did not take it (the same delivery may be posted again).
    Unavailable(String),
}

/// The receiver's use case: checking and taking deliveries. HTTP (the
/// path, the body, the answers) is `http::webhook`'s.
pub struct Receiver {
    cfg: WebhookConfig,
    ingest: Arc<Ingest>,
    seen: Mutex<Seen>,
    max_event_bytes: usize,
}

impl Receiver {
    /// A receiver publishing through `ingest`.
    pub fn new(cfg: WebhookConfig, ingest: Arc<Ingest>, max_event_bytes: usize) -> Self {
        Self {
            cfg,
            ingest,
            seen: Mutex::new(Seen::default()),
            max_event_bytes,
        }
    }

    /// The configuration (path, body bound).
    pub fn config(&self) -> &WebhookConfig {
        &self.cfg
    }

    fn skew_ms(&self) -> u64 {
        u64::try_from(self.cfg.max_skew.as_millis()).unwrap_or(u64::MAX)
    }

    /// The signature header, checked before the body is read: present,
    /// well-formed, and its timestamp within the skew of now.
    pub fn check_header(&self, header: Option<&[u8]>) -> Result<Signature, Refusal> {
        let signature = header.ok_or(Refusal::Unsigned)?;
        let signature = Signature::parse(signature).ok_or(Refusal::MalformedSignature)?;
        if now_ms().abs_diff(signature.timestamp) > self.skew_ms() {
            return Err(Refusal::Stale);
        }
        Ok(signature)
    }

    /// Takes a delivery whose header passed [`check_header`](Self::check_header).
    pub async fn take(&self, signature: &Signature, body: &[u8]) -> Result<Taken, Refusal> {
        let scope = self
            .cfg
            .scope(body, &signature.mac)
            .ok_or(Refusal::BadSignature)?;
        let Some(event) = event_of(body, signature, self.max_event_bytes)? else {
            return Ok(Taken::Test);
        };
        if let Scope::Projects(p) = &scope {
            if !p.contains(&event.key.project.as_str()) {
                return Err(Refusal::WrongProject);
            }
        }
        self.ingest.received(SourceId::Webhook);
        let digest: [u8; 32] = Sha256::digest(body).into();
        let first = self
            .seen
            .lock()
            .first(digest, signature.timestamp, now_ms(), self.skew_ms());
        match first {
            None => return Err(Refusal::Busy),
            Some(false) => {
                self.ingest.duplicate(SourceId::Webhook);
                return Ok(Taken::Duplicate { id: event.id });
            }
            Some(true) => {}
        }
        match self.ingest.publish(SourceId::Webhook, event).await {
            Ok(p) => Ok(Taken::Published {
                id: p.id,
                sequence: p.sequence,
            }),
            Err(e) => {
                // Not taken: the same delivery may be posted again.
                self.seen.lock().at.remove(&digest);
                Ok(Taken::Unavailable(e.to_string()))
            }
        }
    }

    /// Counts a refused delivery.
    pub fn refused(&self, r: Refusal) {
        self.ingest.dropped(SourceId::Webhook, r.label());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, body: &str) -> [u8; 32] {
        let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        m.update(body.as_bytes());
        m.finalize().into_bytes().into()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn signatures_parse_strictly() {
        let mac = [0xab; 32];
        let h = format!("t=1700000000000;{}", hex(&mac));
        assert_eq!(
            Signature::parse(h.as_bytes()),
            Some(Signature {
                timestamp: 1_700_000_000_000,
                mac
            })
        );
        assert!(Signature::parse(h.to_uppercase().replace("T=", "t=").as_bytes()).is_some());
        let m = hex(&mac);
        for bad in [
            String::new(),
            format!("t=;{m}"),
            format!("t=1;{}", hex(&mac[..31])),
            format!("t=1;{m}00"),
            format!("t=1:{m}"),
            format!("t=-1;{m}"),
            format!("t=1;{}", "zz".repeat(32)),
            format!("t=99999999999999999999;{m}"),
            format!("x=1;{m}"),
            format!("t=1;\u{e9}{}", "0".repeat(62)),
        ] {
            assert_eq!(Signature::parse(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(Signature::parse(&vec![b't'; 1 << 20]), None);
    }

    #[test]
    fn any_configured_secret_verifies_and_no_other() {
        let body = r#"{"event":"secrets.modified","timestamp":1}"#;
        let old = Secret::new("old-secret-0123456789");
        let new = Secret::new("new-secret-0123456789");
        let mac = sign("new-secret-0123456789", body);
        assert!(signed_by_any(&[old.clone(), new], body.as_bytes(), &mac));
        assert!(!signed_by_any(
            std::slice::from_ref(&old),
            body.as_bytes(),
            &mac
        ));
        assert!(!signed_by_any(&[old], b"{}", &mac));
        assert!(!signed_by_any(&[], body.as_bytes(), &mac));
    }

    #[test]
    fn bodies_become_one_event_or_a_reason() {
        let sig = |t| Signature {
            timestamp: t,
            mac: [7; 32],
        };
        let body = r#"{"event":"secrets.modified","project":{"workspaceId":"p1","projectId":"p1","projectName":"P","environment":"prod","environmentName":"Production","secretPath":"/apps","changedBy":"u","changedByActorType":"user"},"timestamp":1700000000000}"#;
        let e = event_of(body.as_bytes(), &sig(1_700_000_000_000), 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(e.key.project.as_str(), "p1");
        assert_eq!(e.key.env.as_str(), "prod");
        assert_eq!(e.key.path.as_str(), "/apps");
        assert_eq!(e.key.event_type.name(), "secret:updated");
        assert!(e.id.starts_with("infisical-webhook-"));
        let same = event_of(body.as_bytes(), &sig(1_700_000_000_000), 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(e.id, same.id, "one delivery, one id");
        // The signed timestamp is the header's.
        assert_eq!(
            event_of(body.as_bytes(), &sig(5), 1 << 20).unwrap_err(),
            Refusal::Stale
        );
        let no_path = r#"{"event":"secrets.modified","project":{"projectId":"p1","environment":"prod"},"timestamp":1}"#;
        let e = event_of(no_path.as_bytes(), &sig(1), 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(e.key.path.as_str(), "/");
        let old = r#"{"event":"secrets.modified","project":{"workspaceId":"p2","environment":"prod"},"timestamp":1}"#;
        let e = event_of(old.as_bytes(), &sig(1), 1 << 20).unwrap().unwrap();
        assert_eq!(e.key.project.as_str(), "p2");
        let test =
            r#"{"event":"test","project":{"projectId":"p1","environment":"prod"},"timestamp":1}"#;
        assert!(event_of(test.as_bytes(), &sig(1), 1 << 20)
            .unwrap()
            .is_none());
        for (b, why) in [
            ("nope", Refusal::MalformedBody),
            ("[]", Refusal::Stale),
            (
                r#"{"event":"secrets.rotation-failed","timestamp":1}"#,
                Refusal::UnsupportedEvent,
            ),
            (r#"{"timestamp":1}"#, Refusal::MalformedBody),
            (
                r#"{"event":"secrets.modified","timestamp":1}"#,
                Refusal::MalformedBody,
            ),
            (
                r#"{"event":"secrets.modified","project":{"projectId":7,"environment":"prod"},"timestamp":1}"#,
                Refusal::MalformedBody,
            ),
            (
                r#"{"event":"secrets.modified","project":{"projectId":"p1","environment":"prod","secretPath":["/"]},"timestamp":1}"#,
                Refusal::MalformedBody,
            ),
            (
                r#"{"event":"secrets.modified","project":{"projectId":"p 1","environment":"prod"},"timestamp":1}"#,
                Refusal::BadEvent,
            ),
            (
                r#"{"event":"secrets.modified","project":{"projectId":"p1","environment":"prod","secretPath":"a//b"},"timestamp":1}"#,
                Refusal::BadEvent,
            ),
        ] {
            assert_eq!(
                event_of(b.as_bytes(), &sig(1), 1 << 20).unwrap_err(),
                why,
                "{b}"
            );
        }
    }

    #[test]
    fn a_delivery_is_taken_once() {
        let mut seen = Seen::default();
        assert_eq!(seen.first([1; 32], 1000, 1000, 300_000), Some(true));
        assert_eq!(seen.first([1; 32], 1000, 1001, 300_000), Some(false));
        assert_eq!(seen.first([2; 32], 1000, 1001, 300_000), Some(true));
        // Full of deliveries still within the window: refused, not grown.
        for i in 0..MAX_SEEN as u32 {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_be_bytes());
            d[31] = 9;
            seen.first(d, 2000, 2000, 300_000);
        }
        assert_eq!(seen.first([3; 32], 2000, 2000, 300_000), None);
        assert!(seen.at.len() <= MAX_SEEN);
        // Once they are past the window, room again.
        assert_eq!(seen.first([3; 32], 2000, 400_000, 300_000), Some(true));
    }

    #[test]
    fn a_project_key_signs_for_its_project_only() {
        let cfg = WebhookConfig {
            secrets: vec![Secret::new("global-secret-0123456789")],
            project_secrets: [("p1".to_owned(), vec![Secret::new("p1-secret-0123456789")])].into(),
            ..Default::default()
        };
        let body = b"{}";
        assert_eq!(
            cfg.scope(body, &sign("global-secret-0123456789", "{}")),
            Some(Scope::Any)
        );
        assert_eq!(
            cfg.scope(body, &sign("p1-secret-0123456789", "{}")),
            Some(Scope::Projects(vec!["p1"]))
        );
        assert_eq!(
            cfg.scope(body, &sign("other-secret-0123456789", "{}")),
            None
        );
    }
}
