//! Checked identifiers: project ids and environment slugs.
//!
//! Both are 1..=128 bytes of `[A-Za-z0-9_-]` (UUIDs fit). They can only be built
//! through [`ProjectId::parse`] and [`EnvSlug::parse`], so code past the HTTP edge
//! and the NATS decoder never holds a bad value. They are cheap to clone (an
//! `Arc<str>`), because the router and the decision cache clone them per event.

use std::fmt;
use std::sync::Arc;

/// Longest accepted project id or environment slug, in bytes.
pub const MAX_IDENT_LEN: usize = 128;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_IDENT_LEN} bytes")]
    TooLong,
    #[error("may only contain A-Z, a-z, 0-9, '_' and '-' (found {0:?})")]
    BadChar(char),
}

fn check_ident(s: &str) -> Result<(), IdentError> {
    if s.is_empty() {
        return Err(IdentError::Empty);
    }
    if s.len() > MAX_IDENT_LEN {
        return Err(IdentError::TooLong);
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        Some(c) => Err(IdentError::BadChar(c)),
        None => Ok(()),
    }
}

macro_rules! ident_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Checks `s` and wraps it.
            pub fn parse(s: &str) -> Result<Self, IdentError> {
                check_ident(s)?;
                Ok(Self(Arc::from(s)))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

ident_type!(
    /// A project id (for example a UUID).
    ProjectId
);
ident_type!(
    /// An environment slug such as `prod` or `staging-eu`.
    EnvSlug
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_slugs() {
        assert!(ProjectId::parse("6b1c2f0e-3d7a-4c1e-9f2a-0a1b2c3d4e5f").is_ok());
        assert!(EnvSlug::parse("prod_eu-1").is_ok());
        assert!(EnvSlug::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn refuses_bad_identifiers() {
        assert_eq!(ProjectId::parse(""), Err(IdentError::Empty));
        assert_eq!(ProjectId::parse(&"a".repeat(129)), Err(IdentError::TooLong));
        assert_eq!(ProjectId::parse("p.1"), Err(IdentError::BadChar('.')));
        assert_eq!(EnvSlug::parse("pr*d"), Err(IdentError::BadChar('*')));
        assert_eq!(EnvSlug::parse("prod\n"), Err(IdentError::BadChar('\n')));
        assert_eq!(EnvSlug::parse("é"), Err(IdentError::BadChar('é')));
    }
}
