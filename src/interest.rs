//! What one registration of a subscribe request asks for.
//!
//! An [`Interest`] is an event type, an optional environment and a path
//! pattern, inside the stream's project. It is built from the HTTP request by
//! the `http` module, checked by `policy` at subscribe time, matched by the
//! router for every event and mapped to a NATS subject by `subject`.

use std::fmt;

use crate::event::EventType;
use crate::ident::EnvSlug;
use crate::path::{PathPattern, PathSegments, SecretPath};

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Interest {
    /// The event type.
    pub event_type: EventType,
    /// The environment, or every environment.
    pub env: Option<EnvSlug>,
    /// The secret paths.
    pub path: PathPattern,
}

impl Interest {
    /// Whether an event of this type, environment and path is wanted.
    #[inline]
    pub fn matches(&self, ty: EventType, env: &EnvSlug, path: &SecretPath) -> bool {
        self.matches_split(ty, env, &path.split())
    }

    /// [`matches`](Self::matches) with the path split once per event.
    #[inline]
    pub fn matches_split(&self, ty: EventType, env: &EnvSlug, path: &PathSegments<'_>) -> bool {
        self.event_type == ty
            && self.env.as_ref().is_none_or(|e| e == env)
            && self.path.matches_split(path)
    }
}

impl fmt::Display for Interest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in environment {} under {}",
            self.event_type,
            self.env.as_ref().map(EnvSlug::as_str).unwrap_or("*"),
            self.path
        )
    }
}
