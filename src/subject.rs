//! The NATS subject scheme (a public contract: producers may publish directly).
//!
//! ```text
//! {prefix}.ev.{project}.{env}.{type}.{seg1}...{segN}.~
//! ```
//!
//! Every token is escaped: bytes outside `[A-Za-z0-9_:-]` become `%XX`, so `.`,
//! `*`, `>`, whitespace and `%` can never widen or split a subject, and no escaped
//! token is ever `~`, the terminator that makes "this folder and everything
//! below" one subscription (`apps.>` matches `apps.~` and `apps.db.~` only).
//! This module owns the mapping both ways and nothing else.

use crate::event::{EventKey, EventType};
use crate::ident::{EnvSlug, ProjectId};
use crate::path::{PathPattern, SecretPath, Seg};

/// The first token(s) of every subject herald uses (`nats.prefix`, default
/// `herald`): dot-separated tokens of `[A-Za-z0-9_-]`, checked when the
/// config is read, so no subject built on it can be widened or split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectPrefix(String);

impl SubjectPrefix {
    /// Checks a prefix.
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?}: a prefix is dot-separated tokens of A-Z a-z 0-9 _ -"
            ))
        }
    }

    /// The prefix as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SubjectPrefix {
    fn default() -> Self {
        Self("herald".to_owned())
    }
}

impl std::fmt::Display for SubjectPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for SubjectPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SubjectPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SubjectPrefix::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The token that ends every event subject.
pub const TERMINATOR: &str = "~";

/// The second token of a subject: which family of subjects it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `{prefix}.ev.…`: events as published.
    Events,
    /// `{prefix}.rp.…`: events republished by the replay stream, with their
    /// stream sequence.
    Republished,
}

impl Kind {
    fn token(self) -> &'static str {
        match self {
            Kind::Events => "ev",
            Kind::Republished => "rp",
        }
    }
}

/// Every subject of one kind: `{prefix}.{kind}.>`.
pub fn kind_filter(prefix: &str, kind: Kind) -> String {
    format!("{prefix}.{}.>", kind.token())
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':' || b == b'-'
}

/// Escapes one token: bytes outside `[A-Za-z0-9_:-]` become `%XX` (upper-case hex).
pub fn encode_token(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        }
    }
}

/// Reverses [`encode_token`]. `None` for anything an encoder could not produce
/// (a raw byte outside the plain set, a bad or lower-case escape, bad UTF-8).
pub fn decode_token(t: &str) -> Option<String> {
    let bytes = t.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = hex_val(*bytes.get(i + 1)?)?;
            let lo = hex_val(*bytes.get(i + 2)?)?;
            let v = (hi << 4) | lo;
            if is_plain(v) {
                return None; // not canonical: plain bytes are never escaped
            }
            out.push(v);
            i += 3;
        } else if is_plain(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The subject an event is published on.
pub fn event_subject(prefix: &str, key: &EventKey) -> String {
    let EventKey {
        project,
        env,
        event_type: ty,
        path,
    } = key;
    let mut s = String::with_capacity(64 + path.as_str().len() * 2);
    s.push_str(prefix);
    s.push_str(".ev.");
    encode_token(project.as_str(), &mut s);
    s.push('.');
    encode_token(env.as_str(), &mut s);
    s.push('.');
    encode_token(ty.name(), &mut s);
    for seg in path.segments() {
        s.push('.');
        encode_token(seg, &mut s);
    }
    s.push('.');
    s.push_str(TERMINATOR);
    s
}

/// Decodes an event subject; `None` for anything that is not one.
pub fn decode_event_subject(prefix: &str, subject: &str) -> Option<EventKey> {
    decode_subject(prefix, Kind::Events, subject)
}

/// Decodes a subject of `kind` (an event subject or its republished copy)
/// into the event's key; `None` for anything an encoder could not have made.
pub fn decode_subject(prefix: &str, kind: Kind, subject: &str) -> Option<EventKey> {
    let rest = subject
        .strip_prefix(prefix)?
        .strip_prefix('.')?
        .strip_prefix(kind.token())?
        .strip_prefix('.')?;
    let mut tokens = rest.split('.');
    let project = ProjectId::parse(&decode_token(tokens.next()?)?).ok()?;
    let env = EnvSlug::parse(&decode_token(tokens.next()?)?).ok()?;
    let type_name = decode_token(tokens.next()?)?;
    // Subjects spell the canonical name, never an alias.
    let event_type = EventType::parse(&type_name).filter(|t| t.name() == type_name)?;
    let mut path = String::from("/");
    let mut last_was_term = false;
    for t in tokens {
        if last_was_term {
            return None; // tokens after the terminator
        }
        if t == TERMINATOR {
            last_was_term = true;
            continue;
        }
        // One spelling per key: an empty token, or one that decodes to
        // a `/`, would spell a path the encoder spells otherwise.
        let segment = decode_token(t)?;
        if segment.is_empty() || segment.contains('/') {
            return None;
        }
        if path.len() > 1 {
            path.push('/');
        }
        path.push_str(&segment);
    }
    if !last_was_term {
        return None;
    }
    let path = SecretPath::parse(&path).ok()?;
    Some(EventKey {
        project,
        env,
        event_type,
        path,
    })
}

/// Every subject of `kind` for one project: `{prefix}.{kind}.{project}.>`.
pub fn project_subject(prefix: &str, kind: Kind, project: &ProjectId) -> String {
    let mut s = String::with_capacity(prefix.len() + project.as_str().len() + 8);
    s.push_str(prefix);
    s.push('.');
    s.push_str(kind.token());
    s.push('.');
    encode_token(project.as_str(), &mut s);
    s.push_str(".>");
    s
}

/// The narrowest subject that covers a registration. Patterns NATS cannot
/// express (`**` before the end, globs inside a segment) become the longest
/// literal prefix plus `>`; the instance then filters exactly.
pub fn interest_subject(
    prefix: &str,
    project: &ProjectId,
    env: Option<&EnvSlug>,
    ty: Option<EventType>,
    path: &PathPattern,
) -> String {
    let mut s = String::with_capacity(64);
    s.push_str(prefix);
    s.push_str(".ev.");
    encode_token(project.as_str(), &mut s);
    s.push('.');
    match env {
        Some(e) => encode_token(e.as_str(), &mut s),
        None => s.push('*'),
    }
    s.push('.');
    match ty {
        Some(t) => encode_token(t.name(), &mut s),
        None => s.push('*'),
    }
    for seg in path.segs() {
        s.push('.');
        match seg {
            Seg::Lit(l) => encode_token(l, &mut s),
            Seg::Any => s.push('*'),
            // `>` needs at least one token, which the terminator guarantees.
            Seg::AnyDeep | Seg::Glob(_) => {
                s.push('>');
                return s;
            }
        }
    }
    s.push('.');
    s.push_str(TERMINATOR);
    s
}

/// NATS wildcard matching of a subject against a filter (`*` one token, `>`
/// one or more trailing tokens): the server's rule, for checking the mapping.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pid(s: &str) -> ProjectId {
        ProjectId::parse(s).unwrap()
    }
    fn env(s: &str) -> EnvSlug {
        EnvSlug::parse(s).unwrap()
    }
    fn ty() -> EventType {
        EventType::parse("secret:created").unwrap()
    }
    fn key(project: ProjectId, env: EnvSlug, path: SecretPath) -> EventKey {
        EventKey {
            project,
            env,
            event_type: ty(),
            path,
        }
    }

    #[test]
    fn root_has_no_segment_tokens() {
        let s = event_subject("herald", &key(pid("p1"), env("prod"), SecretPath::root()));
        assert_eq!(s, "herald.ev.p1.prod.secret:created.~");
    }

    #[test]
    fn hostile_segments_are_escaped() {
        let path = SecretPath::parse("/a.b/*/>/ x/%/~").unwrap();
        let s = event_subject("herald", &key(pid("p1"), env("prod"), path.clone()));
        assert_eq!(
            s,
            "herald.ev.p1.prod.secret:created.a%2Eb.%2A.%3E.%20x.%25.%7E.~"
        );
        let back = decode_event_subject("herald", &s).unwrap();
        assert_eq!(back.path, path);
    }

    #[test]
    fn folder_subject_matches_folder_and_below_only() {
        let pat = PathPattern::parse_subscription("/apps").unwrap();
        let f = interest_subject("herald", &pid("p1"), None, None, &pat);
        assert_eq!(f, "herald.ev.p1.*.*.apps.>");
        let sub = |p: &str| {
            event_subject(
                "herald",
                &key(pid("p1"), env("prod"), SecretPath::parse(p).unwrap()),
            )
        };
        assert!(subject_matches(&f, &sub("/apps")));
        assert!(subject_matches(&f, &sub("/apps/db")));
        assert!(!subject_matches(&f, &sub("/apps2")));
        assert!(!subject_matches(&f, &sub("/")));
    }

    #[test]
    fn inexpressible_patterns_fall_back_to_prefix() {
        let pat = PathPattern::parse_exact("/apps/**/creds").unwrap();
        assert_eq!(
            interest_subject("h", &pid("p"), Some(&env("e")), Some(ty()), &pat),
            "h.ev.p.e.secret:created.apps.>"
        );
        let pat = PathPattern::parse_exact("/apps/db-*").unwrap();
        assert_eq!(
            interest_subject("h", &pid("p"), None, None, &pat),
            "h.ev.p.*.*.apps.>"
        );
        let pat = PathPattern::parse_exact("/apps/*").unwrap();
        assert_eq!(
            interest_subject("h", &pid("p"), None, None, &pat),
            "h.ev.p.*.*.apps.*.~"
        );
    }

    #[test]
    fn a_prefix_ending_in_a_kind_token_stays_apart() {
        let p = pid("p1");
        assert_eq!(
            project_subject("my.ev", Kind::Republished, &p),
            "my.ev.rp.p1.>"
        );
        assert_eq!(kind_filter("my.ev", Kind::Events), "my.ev.ev.>");
        let s = event_subject("my.ev", &key(p.clone(), env("prod"), SecretPath::root()));
        assert!(decode_subject("my.ev", Kind::Events, &s).is_some());
        let rp = s.replacen("my.ev.ev.", "my.ev.rp.", 1);
        assert!(decode_subject("my.ev", Kind::Republished, &rp).is_some());
        assert!(decode_subject("my.ev", Kind::Events, &rp).is_none());
    }

    #[test]
    fn decode_refuses_non_canonical_subjects() {
        for bad in [
            "herald.ev.p1.prod.secret:created",
            "herald.ev.p1.prod.secret:created.a.~.b",
            "herald.ev.p1.prod.secret:created.a%2e.~",
            "herald.ev.p1.prod.secret:created.%61.~",
            "herald.ev.p%2E1.prod.secret:created.~",
            "herald.ev.p1.prod.secret:nope.~",
            "herald.ev.p1.prod.secret:created.%2E%2E.~",
            // Another spelling of /apps/db: an empty token, an escaped `/`.
            "herald.ev.p1.prod.secret:created..apps.db.~",
            "herald.ev.p1.prod.secret:created.apps..db.~",
            "herald.ev.p1.prod.secret:created.apps%2Fdb.~",
            "herald.ev.p1.prod.secret:create.apps.db.~",
            "other.ev.p1.prod.secret:created.~",
        ] {
            assert!(decode_event_subject("herald", bad).is_none(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn encoded_tokens_are_safe(s in "\\PC{0,40}") {
            let mut t = String::new();
            encode_token(&s, &mut t);
            prop_assert!(!t.contains(['.', '*', '>', ' ', '\t', '\n', '\r']));
            prop_assert!(t != TERMINATOR);
            prop_assert!(t.bytes().all(|b| b.is_ascii_graphic()));
            prop_assert_eq!(decode_token(&t), Some(s));
        }

        #[test]
        fn event_subjects_round_trip(segs in proptest::collection::vec("[^/\\p{Cc}]{1,12}", 0..6)) {
            let segs: Vec<String> = segs.into_iter().filter(|s| s != "." && s != ".." && !s.contains('*')).collect();
            let text = format!("/{}", segs.join("/"));
            let path = SecretPath::parse(&text).unwrap();
            let s = event_subject("herald", &key(pid("p-1"), env("prod"), path.clone()));
            let back = decode_event_subject("herald", &s).unwrap();
            prop_assert_eq!(back.path, path.clone());
            // The folder interest of any prefix of the path covers it; a sibling's does not.
            let folder = PathPattern::parse_subscription(&text).unwrap();
            let f = interest_subject("herald", &pid("p-1"), None, None, &folder);
            prop_assert!(subject_matches(&f, &s));
            let sibling = format!("{}x", text.trim_end_matches('/'));
            if let Ok(sib) = SecretPath::parse(&sibling) {
                let ss = event_subject("herald", &key(pid("p-1"), env("prod"), sib.clone()));
                prop_assert!(!subject_matches(&f, &ss) || text == "/");
            }
        }
    }
}
