//! Requests of the public API as checked values: a subscribe's project and
//! registrations, parsed from its JSON body or from a query string, with
//! every refusal naming the field.
//!
//! This is the API's request shape (DESIGN.md section 4), not HTTP: the
//! listener hands over bytes or query pairs, and nothing past here holds an
//! unchecked value.

use serde::Deserialize;
use serde_json::Value;

use crate::event::{EventType, EVENT_TYPES};
use crate::ident::{EnvSlug, ProjectId};
use crate::interest::Interest;
use crate::path::PathPattern;

/// What is wrong with a request, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestErrorKind {
    /// The body is not JSON.
    MalformedJson,
    /// The request does not have the documented shape.
    InvalidRequest,
    /// `projectId` is not a project id.
    InvalidProjectId,
    /// Too few or too many registrations, or too many pattern bytes.
    InvalidRegistrations,
    /// A registration names no known event type.
    UnknownEvent,
    /// `environmentSlug` is not a slug.
    InvalidEnvironment,
    /// `secretPath` is not a path or pattern.
    InvalidSecretPath,
    /// A publish is not one event or an array of 1..=N.
    InvalidBatch,
}

impl RequestErrorKind {
    /// The error code clients see.
    pub fn code(self) -> &'static str {
        match self {
            RequestErrorKind::MalformedJson => "malformed_json",
            RequestErrorKind::InvalidRequest => "invalid_request",
            RequestErrorKind::InvalidProjectId => "invalid_project_id",
            RequestErrorKind::InvalidRegistrations => "invalid_registrations",
            RequestErrorKind::UnknownEvent => "unknown_event",
            RequestErrorKind::InvalidEnvironment => "invalid_environment",
            RequestErrorKind::InvalidSecretPath => "invalid_secret_path",
            RequestErrorKind::InvalidBatch => "invalid_batch",
        }
    }
}

/// A request that cannot be taken, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RequestError {
    /// What kind of problem.
    pub kind: RequestErrorKind,
    /// The field, as a path into the request (`register[2].conditions.secretPath`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
    /// The limit that was exceeded, when one was.
    pub limit: Option<usize>,
}

impl RequestError {
    /// A problem with `field`.
    pub fn new(
        kind: RequestErrorKind,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            field: field.into(),
            message: message.into(),
            limit: None,
        }
    }

    fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// Why a body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Larger than `limits.max_body_bytes` (declared, or as it arrived).
    #[error("the request body is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Not received within `server.body_read_timeout`.
    #[error("the request body was not received in time")]
    Timeout,
    /// The connection failed while it was read.
    #[error("the request body could not be read")]
    Unreadable,
    /// Its `Content-Type` is not JSON.
    #[error("send the body as JSON with `Content-Type: application/json`")]
    NotJson,
}

/// How a plain `secretPath` (one without wildcards) is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathSemantics {
    /// That folder and everything below it (herald's native reading).
    FolderAndBelow,
    /// Exactly that folder; `/**` for the subtree (Infisical's reading).
    Exact,
}

/// Bounds on a subscribe request.
#[derive(Clone, Copy, Debug)]
pub struct SubscribeLimits {
    /// Most registrations.
    pub max_registrations: usize,
    /// Most bytes of distinct `secretPath` patterns, together.
    pub max_registration_bytes: usize,
}

/// A checked subscribe request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeRequest {
    /// The project.
    pub project: ProjectId,
    /// The registrations, without repeats.
    pub interests: Vec<Interest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubscribeBody {
    project_id: String,
    register: Vec<Object<RegisterBody>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    event: String,
    #[serde(default)]
    conditions: Option<Object<Conditions>>,
}

/// A struct read only from a JSON object. serde's derived `Deserialize`
/// also takes a struct's fields from an array, in order (`[null, "/x"]` as
/// `conditions`): no client should have a second spelling of a request.
struct Object<T>(T);

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            v @ Value::Object(_) => T::deserialize(v).map(Object).map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "expected an object, found {}",
                kind_of(&other)
            ))),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Conditions {
    #[serde(default)]
    environment_slug: Option<String>,
    #[serde(default)]
    secret_path: Option<String>,
}

/// A JSON body, or a 400 naming it.
pub fn parse_json(bytes: &[u8]) -> Result<Value, RequestError> {
    serde_json::from_slice(bytes).map_err(|e| {
        RequestError::new(
            RequestErrorKind::MalformedJson,
            "body",
            format!("not valid JSON: {e}"),
        )
    })
}

impl SubscribeRequest {
    /// Parses a POST body.
    pub fn from_json(
        body: &[u8],
        semantics: PathSemantics,
        limits: SubscribeLimits,
    ) -> Result<Self, RequestError> {
        let Object(body) = serde_json::from_value(parse_json(body)?).map_err(|e| {
            RequestError::new(RequestErrorKind::InvalidRequest, "body", e.to_string())
        })?;
        Self::build(body, semantics, limits)
    }

    /// Parses the GET form: `projectId`, `event` (repeatable),
    /// `environmentSlug`, `secretPath`, and repeatable `register` JSON
    /// registrations (or arrays of them). Without `event` or `register`, every
    /// event type, with the shared conditions.
    pub fn from_query(
        query: &[(String, String)],
        semantics: PathSemantics,
        limits: SubscribeLimits,
    ) -> Result<Self, RequestError> {
        let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let project_id = get("projectId").ok_or_else(|| {
            RequestError::new(RequestErrorKind::InvalidRequest, "projectId", "is required")
        })?;
        let conditions = || Conditions {
            environment_slug: get("environmentSlug"),
            secret_path: get("secretPath"),
        };
        let shared = |event: &str| {
            Object(RegisterBody {
                event: event.to_owned(),
                conditions: Some(Object(conditions())),
            })
        };
        let mut register = Vec::new();
        for (k, v) in query {
            match k.as_str() {
                "event" => register.push(shared(v)),
                "register" => query_registrations(v, &mut register)?,
                _ => {}
            }
        }
        if !query.iter().any(|(k, _)| k == "event" || k == "register") {
            register.extend(EVENT_TYPES.iter().map(|t| shared(t.name)));
        }
        Self::build(
            SubscribeBody {
                project_id,
                register,
            },
            semantics,
            limits,
        )
    }

    fn build(
        body: SubscribeBody,
        semantics: PathSemantics,
        limits: SubscribeLimits,
    ) -> Result<Self, RequestError> {
        let project = ProjectId::parse(&body.project_id).map_err(|e| {
            RequestError::new(
                RequestErrorKind::InvalidProjectId,
                "projectId",
                e.to_string(),
            )
        })?;
        let max = limits.max_registrations;
        if body.register.is_empty() || body.register.len() > max {
            return Err(RequestError::new(
                RequestErrorKind::InvalidRegistrations,
                "register",
                format!(
                    "between 1 and {max} registrations are accepted; found {}",
                    body.register.len()
                ),
            )
            .with_limit(max));
        }
        let mut interests: Vec<Interest> = Vec::with_capacity(body.register.len());
        let mut pattern_bytes = 0usize;
        let budget = limits.max_registration_bytes;
        for (i, Object(r)) in body.register.into_iter().enumerate() {
            let it = interest(i, r, semantics)?;
            // Identical registrations are one: a client can never get an event twice.
            if interests.contains(&it) {
                continue;
            }
            if !interests.iter().any(|o| o.path == it.path) {
                pattern_bytes += it.path.as_str().len();
            }
            if pattern_bytes > budget {
                return Err(RequestError::new(
                    RequestErrorKind::InvalidRegistrations,
                    format!("register[{i}].conditions.secretPath"),
                    format!(
                        "the registrations' secretPath patterns may hold at most {budget} bytes together"
                    ),
                )
                .with_limit(budget));
            }
            interests.push(it);
        }
        Ok(SubscribeRequest { project, interests })
    }
}

/// One `register` query value: a registration, or an array of them, as JSON.
fn query_registrations(v: &str, out: &mut Vec<Object<RegisterBody>>) -> Result<(), RequestError> {
    let invalid = |at: usize, e: serde_json::Error| {
        RequestError::new(
            RequestErrorKind::InvalidRequest,
            format!("register[{at}]"),
            e.to_string(),
        )
    };
    match serde_json::from_str::<Value>(v).map_err(|e| invalid(out.len(), e))? {
        Value::Array(items) => {
            for item in items {
                let r = serde_json::from_value(item).map_err(|e| invalid(out.len(), e))?;
                out.push(r);
            }
        }
        one => out.push(serde_json::from_value(one).map_err(|e| invalid(out.len(), e))?),
    }
    Ok(())
}

fn interest(i: usize, r: RegisterBody, semantics: PathSemantics) -> Result<Interest, RequestError> {
    let field = |f: &str| format!("register[{i}].{f}");
    let event_type = EventType::parse(&r.event).ok_or_else(|| {
        RequestError::new(
            RequestErrorKind::UnknownEvent,
            field("event"),
            format!(
                "unknown event {:?}; expected one of {}",
                r.event,
                EventType::accepted_names()
            ),
        )
    })?;
    let c = r.conditions.map(|Object(c)| c).unwrap_or_default();
    let env = match c.environment_slug.as_deref() {
        None | Some("*") => None,
        Some(e) => Some(EnvSlug::parse(e).map_err(|err| {
            RequestError::new(
                RequestErrorKind::InvalidEnvironment,
                field("conditions.environmentSlug"),
                err.to_string(),
            )
        })?),
    };
    let path = match c.secret_path.as_deref() {
        None => PathPattern::everything(),
        Some(p) => match semantics {
            PathSemantics::FolderAndBelow => PathPattern::parse_subscription(p),
            PathSemantics::Exact => PathPattern::parse_exact(p),
        }
        .map_err(|err| {
            RequestError::new(
                RequestErrorKind::InvalidSecretPath,
                field("conditions.secretPath"),
                err.to_string(),
            )
        })?,
    };
    Ok(Interest {
        event_type,
        env,
        path,
    })
}

/// The resume point a client sent: the `Last-Event-ID` header's value, or
/// else the `lastEventId` query parameter. An id herald never issued resumes
/// from nothing (0): the client gets `gap`.
pub fn resume_point(header: Option<&str>, query: &[(String, String)]) -> Option<u64> {
    let raw = header.map(str::to_owned).or_else(|| {
        query
            .iter()
            .find(|(k, _)| k == "lastEventId")
            .map(|(_, v)| v.clone())
    })?;
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    Some(raw.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SubscribeLimits = SubscribeLimits {
        max_registrations: 10,
        max_registration_bytes: 4096,
    };

    fn parse(body: &str) -> Result<SubscribeRequest, RequestError> {
        SubscribeRequest::from_json(body.as_bytes(), PathSemantics::FolderAndBelow, LIMITS)
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            ("{", "body", RequestErrorKind::MalformedJson),
            (
                r#"{"projectId":"p"}"#,
                "body",
                RequestErrorKind::InvalidRequest,
            ),
            (
                r#"{"projectId":"a.b","register":[{"event":"secret:created"}]}"#,
                "projectId",
                RequestErrorKind::InvalidProjectId,
            ),
            (
                r#"{"projectId":"p","register":[]}"#,
                "register",
                RequestErrorKind::InvalidRegistrations,
            ),
            (
                r#"{"projectId":"p","register":[{"event":"x"}]}"#,
                "register[0].event",
                RequestErrorKind::UnknownEvent,
            ),
            (
                r#"{"projectId":"p","register":[{"event":"secret:created","conditions":{"environmentSlug":"a b"}}]}"#,
                "register[0].conditions.environmentSlug",
                RequestErrorKind::InvalidEnvironment,
            ),
            (
                r#"{"projectId":"p","register":[{"event":"secret:created"},{"event":"secret:created","conditions":{"secretPath":"x"}}]}"#,
                "register[1].conditions.secretPath",
                RequestErrorKind::InvalidSecretPath,
            ),
        ];
        // A struct's fields never come from an array (serde's second spelling).
        for body in [
            r#"["p",[{"event":"secret:created"}]]"#,
            r#"{"projectId":"p","register":[["secret:created"]]}"#,
            r#"{"projectId":"p","register":[{"event":"secret:created","conditions":[null,null]}]}"#,
            r#"{"projectId":"p","register":[{"event":"secret:created","conditions":"x"}]}"#,
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.kind, RequestErrorKind::InvalidRequest, "{body}");
        }
        for (body, field, kind) in cases {
            let e = parse(body).unwrap_err();
            assert_eq!((e.field.as_str(), e.kind), (field, kind), "{body}");
        }
    }

    #[test]
    fn plain_paths_read_by_semantics() {
        let body = r#"{"projectId":"p","register":[{"event":"secret:update","conditions":{"secretPath":"/apps"}}]}"#;
        let native = parse(body).unwrap();
        assert_eq!(native.interests[0].path.as_str(), "/apps/**");
        let exact =
            SubscribeRequest::from_json(body.as_bytes(), PathSemantics::Exact, LIMITS).unwrap();
        assert_eq!(exact.interests[0].path.as_str(), "/apps");
        // Repeats are one registration.
        let twice = r#"{"projectId":"p","register":[{"event":"secret:created"},{"event":"secret:create"}]}"#;
        assert_eq!(parse(twice).unwrap().interests.len(), 1);
    }

    #[test]
    fn query_registrations_come_one_by_one_or_as_an_array() {
        let q = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            SubscribeRequest::from_query(&pairs, PathSemantics::FolderAndBelow, LIMITS)
        };
        let one = r#"{"event":"secret:created"}"#;
        let many = r#"[{"event":"secret:updated"},{"event":"secret:deleted","conditions":{"secretPath":"/a"}}]"#;
        let got = q(&[("projectId", "p"), ("register", one), ("register", many)]).unwrap();
        let paths: Vec<&str> = got.interests.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["/**", "/**", "/a/**"]);
        let e = q(&[
            ("projectId", "p"),
            ("register", one),
            ("register", r#"[{"event":1}]"#),
        ])
        .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.kind),
            ("register[1]", RequestErrorKind::InvalidRequest)
        );
        // Neither `event` nor `register`: every event type.
        let all = q(&[("projectId", "p"), ("secretPath", "/a")]).unwrap();
        assert_eq!(all.interests.len(), EVENT_TYPES.len());
        assert!(all.interests.iter().all(|i| i.path.as_str() == "/a/**"));
        let eleven = format!("[{}]", [one; 11].join(","));
        let e = q(&[("projectId", "p"), ("register", &eleven)]).unwrap_err();
        assert_eq!(
            e.kind,
            RequestErrorKind::InvalidRegistrations,
            "repeats count before they merge"
        );
    }

    #[test]
    fn resume_points() {
        assert_eq!(resume_point(Some(" 42 "), &[]), Some(42));
        assert_eq!(resume_point(Some("x"), &[]), Some(0));
        assert_eq!(resume_point(Some(""), &[]), None);
        let q = vec![("lastEventId".to_owned(), "7".to_owned())];
        assert_eq!(resume_point(None, &q), Some(7));
        assert_eq!(resume_point(Some("9"), &q), Some(9), "the header wins");
    }
}
