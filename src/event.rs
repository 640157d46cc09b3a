//! Event types and the CloudEvents 1.0 envelope.
//!
//! The table [`EVENT_TYPES`] is the one place that lists the resources and
//! actions herald knows; adding a resource is one line there. An [`Event`] is a
//! validated envelope: it can only be built by [`Event::from_json`], which checks
//! every attribute and the size limit, fills `id` and `time` when a publisher left
//! them out, and keeps the canonical JSON that is sent to clients unchanged.

use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::ident::{EnvSlug, ProjectId};
use crate::path::SecretPath;

/// One known event type: its canonical name and the API spellings accepted for it.
#[derive(Debug)]
pub struct EventTypeDef {
    /// Canonical name, as carried in the envelope and on the SSE `event:` line.
    pub name: &'static str,
    /// Other spellings accepted in subscribe and publish requests.
    pub aliases: &'static [&'static str],
}

/// Every event type herald knows. The index in this table is the [`EventType`].
pub const EVENT_TYPES: &[EventTypeDef] = &[
    EventTypeDef {
        name: "secret:created",
        aliases: &["secret:create"],
    },
    EventTypeDef {
        name: "secret:updated",
        aliases: &["secret:update"],
    },
    EventTypeDef {
        name: "secret:deleted",
        aliases: &["secret:delete"],
    },
    EventTypeDef {
        name: "secret:import-mutation",
        aliases: &[],
    },
];

/// A known event type (an index into [`EVENT_TYPES`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(u8);

impl EventType {
    /// Looks up a canonical name or an alias.
    pub fn parse(s: &str) -> Option<Self> {
        EVENT_TYPES
            .iter()
            .position(|d| d.name == s || d.aliases.contains(&s))
            .map(|i| Self(i as u8))
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        EVENT_TYPES[self.0 as usize].name
    }

    /// The present-tense spelling Infisical's API uses (`secret:create`),
    /// the canonical name where there is no other.
    pub fn api_name(self) -> &'static str {
        let def = &EVENT_TYPES[self.0 as usize];
        def.aliases.first().copied().unwrap_or(def.name)
    }

    /// All known types.
    pub fn all() -> impl Iterator<Item = EventType> {
        (0..EVENT_TYPES.len()).map(|i| EventType(i as u8))
    }

    /// A human list of the accepted names, for error messages.
    pub fn accepted_names() -> String {
        EVENT_TYPES
            .iter()
            .flat_map(|d| std::iter::once(d.name).chain(d.aliases.iter().copied()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What kind of problem an event has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventErrorKind {
    /// Not a JSON object of the envelope's shape.
    Malformed,
    /// A required attribute is absent or empty.
    MissingAttribute,
    /// An attribute has a bad value or type.
    BadAttribute,
    /// `type` names no known event type.
    UnknownType,
    /// The canonical JSON is over the size limit.
    TooLarge,
}

impl EventErrorKind {
    /// A stable label (`herald_events_rejected_total{reason}`).
    pub fn label(self) -> &'static str {
        match self {
            EventErrorKind::Malformed => "malformed",
            EventErrorKind::MissingAttribute => "missing_attribute",
            EventErrorKind::BadAttribute => "bad_attribute",
            EventErrorKind::UnknownType => "unknown_type",
            EventErrorKind::TooLarge => "too_large",
        }
    }
}

/// Why an event was refused. `field` names the offending attribute.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct EventError {
    /// The attribute (for example `secretpath`), or `event` for the whole object.
    pub field: String,
    /// What kind of problem.
    pub kind: EventErrorKind,
    /// What is wrong with it.
    pub message: String,
}

impl EventError {
    fn new(field: &str, kind: EventErrorKind, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            kind,
            message: message.into(),
        }
    }
}

/// Where an event happened: what routing, subscriptions and policies look at.
/// Built once per event (from the envelope, or from a NATS subject) and
/// borrowed by every check after that.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventKey {
    /// The `projectid` extension.
    pub project: ProjectId,
    /// The event type.
    pub event_type: EventType,
    /// The `environment` extension.
    pub env: EnvSlug,
    /// The `secretpath` extension.
    pub path: SecretPath,
}

impl fmt::Display for EventKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in project {}, environment {}, path {}",
            self.event_type, self.project, self.env, self.path
        )
    }
}

/// A validated CloudEvent.
#[derive(Clone, Debug)]
pub struct Event {
    /// The `id` attribute.
    pub id: String,
    /// Where it happened.
    pub key: EventKey,
    /// The canonical JSON (one line), as sent to clients.
    pub json: String,
    /// `data.secretKeys`, when it is a list of strings (the names of the
    /// secrets the event is about; dialects that itemize by key read it).
    pub secret_keys: Box<[Box<str>]>,
}

/// Attributes herald knows; every other top-level key is an extension attribute.
#[derive(Deserialize)]
struct RawEnvelope {
    specversion: Option<Value>,
    id: Option<Value>,
    source: Option<Value>,
    #[serde(rename = "type")]
    ty: Option<Value>,
    projectid: Option<Value>,
    environment: Option<Value>,
    secretpath: Option<Value>,
    time: Option<Value>,
    datacontenttype: Option<Value>,
    data: Option<Value>,
    #[serde(flatten)]
    extensions: Map<String, Value>,
}

fn required_str(v: Option<Value>, field: &str) -> Result<String, EventError> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(EventError::new(
            field,
            EventErrorKind::MissingAttribute,
            "must not be empty",
        )),
        Some(_) => Err(EventError::new(
            field,
            EventErrorKind::BadAttribute,
            "must be a string",
        )),
        None => Err(EventError::new(
            field,
            EventErrorKind::MissingAttribute,
            "is required",
        )),
    }
}

fn optional_str(v: Option<Value>, field: &str) -> Result<Option<String>, EventError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        other => required_str(other, field).map(Some),
    }
}

/// Longest accepted `id` or `source`, in bytes.
const MAX_ATTR_LEN: usize = 256;

impl Event {
    /// Validates one envelope (already parsed JSON) and builds the canonical
    /// event. `max_bytes` bounds the canonical JSON.
    pub fn from_json(value: Value, max_bytes: usize) -> Result<Self, EventError> {
        if !value.is_object() {
            return Err(EventError::new(
                "event",
                EventErrorKind::Malformed,
                "must be a JSON object",
            ));
        }
        let raw: RawEnvelope = serde_json::from_value(value)
            .map_err(|e| EventError::new("event", EventErrorKind::Malformed, e.to_string()))?;

        let spec = required_str(raw.specversion, "specversion")?;
        if spec != "1.0" {
            return Err(EventError::new(
                "specversion",
                EventErrorKind::BadAttribute,
                "must be \"1.0\"",
            ));
        }
        let id = match optional_str(raw.id, "id")? {
            Some(id) => id,
            None => uuid::Uuid::new_v4().to_string(),
        };
        if id.len() > MAX_ATTR_LEN || id.chars().any(char::is_control) {
            return Err(EventError::new(
                "id",
                EventErrorKind::BadAttribute,
                format!("must be at most {MAX_ATTR_LEN} bytes without control characters"),
            ));
        }
        let source = required_str(raw.source, "source")?;
        if source.len() > MAX_ATTR_LEN || source.chars().any(char::is_control) {
            return Err(EventError::new(
                "source",
                EventErrorKind::BadAttribute,
                format!("must be at most {MAX_ATTR_LEN} bytes without control characters"),
            ));
        }
        let ty = required_str(raw.ty, "type")?;
        let event_type = EventType::parse(&ty).ok_or_else(|| {
            EventError::new(
                "type",
                EventErrorKind::UnknownType,
                format!(
                    "unknown event type {ty:?}; expected one of {}",
                    EventType::accepted_names()
                ),
            )
        })?;
        let project =
            ProjectId::parse(&required_str(raw.projectid, "projectid")?).map_err(|e| {
                EventError::new("projectid", EventErrorKind::BadAttribute, e.to_string())
            })?;
        let env = EnvSlug::parse(&required_str(raw.environment, "environment")?).map_err(|e| {
            EventError::new("environment", EventErrorKind::BadAttribute, e.to_string())
        })?;
        let path =
            SecretPath::parse(&required_str(raw.secretpath, "secretpath")?).map_err(|e| {
                EventError::new("secretpath", EventErrorKind::BadAttribute, e.to_string())
            })?;
        let time = match optional_str(raw.time, "time")? {
            Some(t) => {
                time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| {
                        EventError::new(
                            "time",
                            EventErrorKind::BadAttribute,
                            "must be an RFC 3339 timestamp",
                        )
                    })?;
                t
            }
            None => now_rfc3339(),
        };
        let datacontenttype = optional_str(raw.datacontenttype, "datacontenttype")?;
        let data = match raw.data {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(Value::Object(m)),
            Some(_) => {
                return Err(EventError::new(
                    "data",
                    EventErrorKind::BadAttribute,
                    "must be a JSON object",
                ))
            }
        };
        check_extensions(&raw.extensions)?;

        let mut out = Map::new();
        out.insert("specversion".into(), Value::from("1.0"));
        out.insert("id".into(), Value::from(id.clone()));
        out.insert("source".into(), Value::from(source));
        out.insert("type".into(), Value::from(event_type.name()));
        out.insert("projectid".into(), Value::from(project.as_str()));
        out.insert("environment".into(), Value::from(env.as_str()));
        out.insert("secretpath".into(), Value::from(path.as_str()));
        out.insert("time".into(), Value::from(time));
        if let Some(ct) = datacontenttype {
            out.insert("datacontenttype".into(), Value::from(ct));
        }
        for (k, v) in raw.extensions {
            out.insert(k, v);
        }
        let secret_keys = data
            .as_ref()
            .and_then(|d| d.get("secretKeys"))
            .and_then(Value::as_array)
            .map(|keys| {
                keys.iter()
                    .filter_map(Value::as_str)
                    .map(Box::from)
                    .collect::<Box<[Box<str>]>>()
            })
            .unwrap_or_default();
        if let Some(d) = data {
            out.insert("data".into(), d);
        }
        // serde_json escapes every control character, so the JSON is one line.
        let json = Value::Object(out).to_string();
        if json.len() > max_bytes {
            return Err(EventError::new(
                "event",
                EventErrorKind::TooLarge,
                format!(
                    "encoded event is {} bytes; the limit is {max_bytes}",
                    json.len()
                ),
            ));
        }
        Ok(Event {
            id,
            key: EventKey {
                project,
                event_type,
                env,
                path,
            },
            json,
            secret_keys,
        })
    }
}

/// CloudEvents 1.0 extension attributes: names of 1 to 20 lower-case ASCII
/// letters or digits, scalar values.
fn check_extensions(extensions: &Map<String, Value>) -> Result<(), EventError> {
    for (name, v) in extensions {
        let ok_name = !name.is_empty()
            && name.len() <= 20
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok_name {
            return Err(EventError::new(
                name,
                EventErrorKind::BadAttribute,
                "unknown attribute; extension names are 1-20 lower-case letters or digits",
            ));
        }
        if !(v.is_string() || v.is_number() || v.is_boolean()) {
            return Err(EventError::new(
                name,
                EventErrorKind::BadAttribute,
                "extension values must be strings, numbers or booleans",
            ));
        }
    }
    Ok(())
}

/// The current time as RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A time as RFC 3339 (UTC), as herald writes every time it shows.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "specversion": "1.0", "source": "/test", "type": "secret:updated",
            "projectid": "p1", "environment": "prod", "secretpath": "/apps/db",
            "data": {"secretKeys": ["DB_PASSWORD"]}
        })
    }

    #[test]
    fn table_resolves_names_and_aliases() {
        assert_eq!(
            EventType::parse("secret:create").map(EventType::name),
            Some("secret:created")
        );
        assert_eq!(
            EventType::parse("secret:deleted").map(EventType::name),
            Some("secret:deleted")
        );
        assert!(EventType::parse("secret:exploded").is_none());
        assert_eq!(EventType::all().count(), EVENT_TYPES.len());
    }

    #[test]
    fn fills_id_and_time_and_canonicalizes() {
        let e = Event::from_json(base(), 65536).unwrap();
        assert!(!e.id.is_empty());
        let v: Value = serde_json::from_str(&e.json).unwrap();
        assert_eq!(v["type"], "secret:updated");
        assert!(v["time"].is_string());
        assert_eq!(v["data"]["secretKeys"][0], "DB_PASSWORD");
        assert!(!e.json.contains('\n'));
        assert_eq!(&*e.secret_keys, &[Box::from("DB_PASSWORD")]);
    }

    #[test]
    fn alias_is_canonicalized() {
        let mut v = base();
        v["type"] = json!("secret:delete");
        let e = Event::from_json(v, 65536).unwrap();
        assert_eq!(e.key.event_type.name(), "secret:deleted");
        assert!(e.json.contains("\"type\":\"secret:deleted\""));
    }

    #[test]
    fn refuses_bad_envelopes_naming_the_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("specversion", json!("0.3"), "specversion"),
            ("type", json!("nope"), "type"),
            ("projectid", json!("a.b"), "projectid"),
            ("environment", json!(""), "environment"),
            ("secretpath", json!("/a/../b"), "secretpath"),
            ("secretpath", json!("/a\r\nb"), "secretpath"),
            ("time", json!("yesterday"), "time"),
            ("data", json!([1]), "data"),
            ("Bad-Ext", json!("x"), "Bad-Ext"),
            ("ext", json!({"nested": true}), "ext"),
            ("id", json!("a\nb"), "id"),
        ];
        for (key, val, field) in cases {
            let mut v = base();
            v[key] = val;
            let err = Event::from_json(v, 65536).unwrap_err();
            assert_eq!(err.field, field, "{key}");
        }
        let mut v = base();
        v.as_object_mut().unwrap().remove("source");
        assert_eq!(Event::from_json(v, 65536).unwrap_err().field, "source");
        assert_eq!(
            Event::from_json(json!([1]), 65536).unwrap_err().field,
            "event"
        );
    }

    #[test]
    fn enforces_size_limit() {
        let mut v = base();
        v["data"] = json!({"blob": "x".repeat(2000)});
        assert_eq!(
            Event::from_json(v, 1024).unwrap_err().kind,
            EventErrorKind::TooLarge
        );
    }
}
