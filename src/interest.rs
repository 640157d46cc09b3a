//! What one registration of a subscribe request asks for.
//!
//! An [`Interest`] is an event type, an optional environment and a path
//! pattern, inside the stream's project. It is built from the HTTP request by
//! the `http` module, checked by `policy` at subscribe time, matched by the
//! router for every event and mapped to a NATS subject by `subject`.

use std::fmt;

use crate::event::{EventKey, EventType};
use crate::ident::EnvSlug;
use crate::path::{PathPattern, PathSegments};

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
    /// Whether an event is wanted.
    #[inline]
    pub fn matches(&self, key: &EventKey) -> bool {
        self.matches_split(key, &key.path.split())
    }

    /// [`matches`](Self::matches) with the event's path split once for many
    /// registrations.
    #[inline]
    pub fn matches_split(&self, key: &EventKey, path: &PathSegments<'_>) -> bool {
        self.event_type == key.event_type
            && self.env.as_ref().is_none_or(|e| *e == key.env)
            && self.path.matches_split(path)
    }
}

/// A registration as the API writes it: `{"event", "environmentSlug", "secretPath"}`.
impl serde::Serialize for Interest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Registration", 3)?;
        st.serialize_field("event", self.event_type.name())?;
        st.serialize_field("environmentSlug", &self.env.as_ref().map(EnvSlug::as_str))?;
        st.serialize_field("secretPath", self.path.as_str())?;
        st.end()
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
