//! Checked identifiers: project ids, environment slugs and principals.
//!
//! Project ids and environment slugs are 1..=128 bytes of `[A-Za-z0-9_-]`
//! (UUIDs fit). A [`Principal`] is the identity a verified token names. They
//! can only be built through their `parse` functions, so code past the HTTP
//! edge and the NATS decoder never holds a bad value. They are cheap to clone
//! (an `Arc<str>`), because the router and the decision cache clone them per
//! event.
//!
//! Identities and roles live in separate namespaces (DESIGN.md section 12): a
//! role is a policy name beginning `role:`, and no principal can be one or look
//! like one ([`looks_like_role`]), so no token can ever name a role.

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

/// The prefix every role name carries in a policy.
pub const ROLE_PREFIX: &str = "role:";

/// Whether a policy name is a role (`role:…`).
pub fn is_role_name(name: &str) -> bool {
    name.starts_with(ROLE_PREFIX)
}

/// Whether a name is a role or could be taken for one: `role:`, `Role:`,
/// `ROLE-`, `roles.`, `role_`… (a word `role` or `roles`, any case, followed by
/// anything but a letter or digit). Such a name is never a principal, and a
/// policy may not grant to it as an identity.
pub fn looks_like_role(name: &str) -> bool {
    let lower = name.as_bytes();
    let word = |w: &[u8]| {
        lower.len() >= w.len()
            && lower[..w.len()].eq_ignore_ascii_case(w)
            && lower
                .get(w.len())
                .is_none_or(|b| !b.is_ascii_alphanumeric())
    };
    word(b"role") || word(b"roles")
}

/// Characters that change how a name is shown without showing themselves
/// (zero-width, joiners, direction overrides and isolates, the soft hyphen,
/// the byte-order mark): two names that look the same in a log or an admin
/// view must be the same name.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// Separates an identity from the roles its token's claims give it, in the
/// subject policies are asked about ([`Principal::with_roles`]). No identity
/// or role name holds it (it is a control character).
pub const ROLE_SEPARATOR: char = '\n';

/// Longest accepted principal, in bytes.
pub const MAX_PRINCIPAL_LEN: usize = 256;

/// Why a principal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_PRINCIPAL_LEN} bytes")]
    TooLong,
    #[error("must not contain control characters, spaces, commas or invisible characters")]
    BadChar,
    #[error("must not be or look like a role name (`role:…`)")]
    RoleLike,
}

/// The identity a verified token names: what policies grant to (DESIGN.md
/// section 12). Never empty, at most [`MAX_PRINCIPAL_LEN`] bytes, no control
/// characters, spaces or commas (a policy line could not name it), and never
/// a role name or anything shaped like one.
#[derive(Clone, Eq, PartialOrd, Ord)]
pub struct Principal(Arc<str>);

impl std::hash::Hash for Principal {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As the text, which is what equality compares.
        (*self.0).hash(state);
    }
}

impl PartialEq for Principal {
    /// Streams of one caller share one allocation: compared on every
    /// delivery, most equal principals are the same pointer.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || *self.0 == *other.0
    }
}

impl Principal {
    /// Checks `s` and wraps it.
    pub fn parse(s: &str) -> Result<Self, PrincipalError> {
        if s.is_empty() {
            return Err(PrincipalError::Empty);
        }
        if s.len() > MAX_PRINCIPAL_LEN {
            return Err(PrincipalError::TooLong);
        }
        if s.chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == ',' || is_invisible(c))
        {
            return Err(PrincipalError::BadChar);
        }
        if looks_like_role(s) {
            return Err(PrincipalError::RoleLike);
        }
        Ok(Self(Arc::from(s)))
    }

    /// The subject policies are asked about: this identity, acting also
    /// as `roles` (from its token's claims; role names, `role:…`). `roles`
    /// must be valid role names; they are kept sorted, once each.
    pub fn with_roles(&self, roles: &[String]) -> Self {
        if roles.is_empty() {
            return self.clone();
        }
        let mut sorted: Vec<&str> = roles.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut s = String::from(self.identity());
        for r in sorted {
            s.push(ROLE_SEPARATOR);
            s.push_str(r);
        }
        Self(Arc::from(s))
    }

    /// The identity alone (without roles from claims).
    pub fn identity(&self) -> &str {
        self.0.split(ROLE_SEPARATOR).next().unwrap_or_default()
    }

    /// The roles its token's claims give it (see [`with_roles`](Self::with_roles)).
    pub fn claimed_roles(&self) -> impl Iterator<Item = &str> {
        self.0.split(ROLE_SEPARATOR).skip(1)
    }

    /// The subject as text: the identity, and its claimed roles after a
    /// [`ROLE_SEPARATOR`] each.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared text (the router and caches keep it without copying).
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

impl fmt::Display for Principal {
    /// The identity, and its claimed roles in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.identity())?;
        let mut roles = self.claimed_roles().peekable();
        if roles.peek().is_some() {
            f.write_str(" [")?;
            for (i, r) in roles.enumerate() {
                if i > 0 {
                    f.write_str(" ")?;
                }
                f.write_str(r)?;
            }
            f.write_str("]")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

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

    #[test]
    fn principals_can_never_be_roles() {
        for bad in [
            "role:admin",
            "Role:admin",
            "ROLE:reader",
            "role",
            "roles",
            "role-admin",
            "roles.x",
            "role_x",
            "role/x",
        ] {
            assert_eq!(
                Principal::parse(bad),
                Err(PrincipalError::RoleLike),
                "{bad}"
            );
        }
        for invisible in [
            "ali\u{200B}ce",
            "alice\u{202E}",
            "\u{FEFF}alice",
            "al\u{00AD}ice",
            "a\u{2066}b",
        ] {
            assert_eq!(
                Principal::parse(invisible),
                Err(PrincipalError::BadChar),
                "{invisible:?}"
            );
        }
        for ok in [
            "alice",
            "ünïcödé",
            "roleplay",
            "rolex",
            "svc:role:admin",
            "6b1c2f0e-3d7a",
        ] {
            assert!(Principal::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(Principal::parse(""), Err(PrincipalError::Empty));
        assert_eq!(Principal::parse("a b"), Err(PrincipalError::BadChar));
        assert_eq!(Principal::parse("a,b"), Err(PrincipalError::BadChar));
        assert_eq!(Principal::parse("a\nb"), Err(PrincipalError::BadChar));
        assert_eq!(
            Principal::parse(&"a".repeat(257)),
            Err(PrincipalError::TooLong)
        );
    }
}
