//! Secret paths and path patterns.
//!
//! A [`SecretPath`] is a concrete, normalized, absolute folder path of an event
//! (`/`, `/apps`, `/apps/db`). A [`PathPattern`] is what a subscription or a policy
//! line asks for: literal segments, `*` (exactly one segment), `**` (zero or more
//! segments) and segments with `*` inside (`db-*`, any run of characters within
//! one segment).
//!
//! Matching never allocates and never panics; it runs on the delivery hot path and
//! inside casbin's matcher. The pattern-against-pattern relations
//! ([`PathPattern::overlaps`], [`PathPattern::covers`]) serve the subscribe-time
//! permission check, where a registration is itself a pattern.

use std::fmt;
use std::sync::Arc;

/// Longest accepted path, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Most accepted segments in a path or pattern.
pub const MAX_SEGMENTS: usize = 32;

/// Why a path or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("must start with '/'")]
    NotAbsolute,
    #[error("must be at most {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("must have at most {MAX_SEGMENTS} segments")]
    TooManySegments,
    #[error("must not contain empty segments ('//') or a trailing '/'")]
    EmptySegment,
    #[error("must not contain '.' or '..' segments")]
    DotSegment,
    #[error("must not contain control characters")]
    ControlChar,
}

fn split_checked(s: &str) -> Result<impl Iterator<Item = &str>, PathError> {
    split_within(s, MAX_PATH_LEN, MAX_SEGMENTS)
}

fn split_within(
    s: &str,
    max_len: usize,
    max_segments: usize,
) -> Result<impl Iterator<Item = &str>, PathError> {
    if !s.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if s.len() > max_len {
        return Err(PathError::TooLong);
    }
    if s.chars().any(char::is_control) {
        return Err(PathError::ControlChar);
    }
    let body = &s[1..];
    if body.is_empty() {
        return Ok(None.into_iter().flatten());
    }
    let mut count = 0;
    for seg in body.split('/') {
        count += 1;
        if seg.is_empty() {
            return Err(PathError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(PathError::DotSegment);
        }
    }
    if count > max_segments {
        return Err(PathError::TooManySegments);
    }
    Ok(Some(body.split('/')).into_iter().flatten())
}

/// A concrete, normalized, absolute secret folder path.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretPath(Arc<str>);

impl SecretPath {
    /// Checks and wraps a concrete path. A `*` in a concrete path is an ordinary
    /// character: only patterns give it a meaning.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        split_checked(s)?.for_each(drop);
        Ok(Self(Arc::from(s)))
    }

    /// The root folder `/`.
    pub fn root() -> Self {
        Self(Arc::from("/"))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segments, empty for the root.
    pub fn segments(&self) -> impl Iterator<Item = &str> + Clone {
        let body = &self.0[1..];
        body.split('/').filter(|s| !s.is_empty())
    }

    /// The segments on the stack, for matching against many patterns.
    pub fn split(&self) -> PathSegments<'_> {
        let mut s = PathSegments {
            items: [""; MAX_SEGMENTS],
            len: 0,
        };
        // A SecretPath has at most MAX_SEGMENTS segments (checked at parse).
        for seg in self.segments().take(MAX_SEGMENTS) {
            s.items[s.len] = seg;
            s.len += 1;
        }
        s
    }
}

impl fmt::Display for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One segment of a [`PathPattern`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Seg {
    /// A literal segment.
    Lit(Box<str>),
    /// `*`: exactly one segment.
    Any,
    /// `**`: zero or more segments.
    AnyDeep,
    /// A segment with `*` inside, such as `db-*`.
    Glob(Box<str>),
}

/// A pattern over secret paths. Cloning shares one allocation: a stream's
/// registrations and the router's groups hold the same pattern, not copies.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PathPattern(Arc<PatternInner>);

#[derive(PartialEq, Eq, Hash)]
struct PatternInner {
    text: Box<str>,
    segs: Box<[Seg]>,
}

impl PathPattern {
    fn from_segs(segs: Vec<Seg>) -> Self {
        let text = render(&segs).into_boxed_str();
        Self(Arc::new(PatternInner {
            text,
            segs: segs.into(),
        }))
    }
}

impl PathPattern {
    /// Parses a pattern exactly as written: `/apps` matches only `/apps`.
    /// This is the policy-file reading.
    pub fn parse_exact(s: &str) -> Result<Self, PathError> {
        Self::from_split(split_checked(s)?)
    }

    /// Parses what [`as_str`](Self::as_str) rendered: a subscription's
    /// pattern may be a path of the full length with `/**` added.
    pub fn parse_rendered(s: &str) -> Result<Self, PathError> {
        Self::from_split(split_within(s, MAX_PATH_LEN + 3, MAX_SEGMENTS + 1)?)
    }

    fn from_split<'a>(split: impl Iterator<Item = &'a str>) -> Result<Self, PathError> {
        let mut segs = Vec::new();
        for seg in split {
            segs.push(match seg {
                "*" => Seg::Any,
                "**" => Seg::AnyDeep,
                g if g.contains('*') => Seg::Glob(g.into()),
                lit => Seg::Lit(lit.into()),
            });
        }
        // Collapse `**/**`: same meaning, and it keeps matching linear.
        segs.dedup_by(|a, b| *a == Seg::AnyDeep && *b == Seg::AnyDeep);
        Ok(Self::from_segs(segs))
    }

    /// Parses a subscription's `secretPath`: a path without wildcards means that
    /// folder and everything below it (`/apps` is `/apps/**`); a pattern with
    /// wildcards is taken as written.
    pub fn parse_subscription(s: &str) -> Result<Self, PathError> {
        let p = Self::parse_exact(s)?;
        if p.segs().iter().all(|s| matches!(s, Seg::Lit(_))) {
            // Every path a publisher may use can be subscribed to: the
            // implied `**` may be one segment past MAX_SEGMENTS.
            let mut segs = p.segs().to_vec();
            segs.push(Seg::AnyDeep);
            return Ok(Self::from_segs(segs));
        }
        Ok(p)
    }

    /// Everything: `/**`.
    pub fn everything() -> Self {
        Self::from_segs(vec![Seg::AnyDeep])
    }

    /// The normalized pattern text.
    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// The segments.
    pub fn segs(&self) -> &[Seg] {
        &self.0.segs
    }

    /// Bytes this pattern holds (its text and its segments), for bounds on
    /// what one stream may keep.
    pub fn footprint(&self) -> usize {
        self.0.text.len() * 2 + self.0.segs.len() * std::mem::size_of::<Seg>()
    }

    /// Whether the concrete `path` is matched by this pattern.
    pub fn matches(&self, path: &SecretPath) -> bool {
        self.matches_split(&path.split())
    }

    /// [`matches`](Self::matches) on a path split once for many patterns.
    pub fn matches_split(&self, path: &PathSegments<'_>) -> bool {
        seq_match(self.segs(), path.as_slice(), |p, t| match p {
            Seg::Lit(l) => &**l == *t,
            Seg::Any => true,
            Seg::Glob(g) => glob_match(g, t),
            Seg::AnyDeep => false,
        })
    }

    /// Whether every path `other` matches is also matched by `self` (sound: a
    /// `true` is always right; some exotic true cases answer `false`).
    pub fn covers(&self, other: &PathPattern) -> bool {
        seq_match(self.segs(), other.segs(), |p, t| match (p, t) {
            (_, Seg::AnyDeep) => false,
            (Seg::AnyDeep, _) => false,
            (Seg::Any, _) => true,
            (Seg::Lit(a), Seg::Lit(b)) => a == b,
            (Seg::Lit(_), _) => false,
            (Seg::Glob(g), Seg::Lit(b)) => glob_match(g, b),
            (Seg::Glob(g), Seg::Glob(h)) => glob_covers(g, h),
            (Seg::Glob(g), Seg::Any) => g.chars().all(|c| c == '*'),
        })
    }

    /// Whether some concrete path is matched by both patterns.
    pub fn overlaps(&self, other: &PathPattern) -> bool {
        let (a, b) = (self.segs(), other.segs());
        // reach[i][j]: a[..i] and b[..j] can match the same segment sequence.
        let mut reach = vec![vec![false; b.len() + 1]; a.len() + 1];
        reach[0][0] = true;
        for i in 0..=a.len() {
            for j in 0..=b.len() {
                if !reach[i][j] {
                    continue;
                }
                if i < a.len() && a[i] == Seg::AnyDeep {
                    reach[i + 1][j] = true;
                    if j < b.len() {
                        reach[i][j + 1] = true;
                    }
                }
                if j < b.len() && b[j] == Seg::AnyDeep {
                    reach[i][j + 1] = true;
                    if i < a.len() {
                        reach[i + 1][j] = true;
                    }
                }
                if i < a.len() && j < b.len() && seg_overlap(&a[i], &b[j]) {
                    reach[i + 1][j + 1] = true;
                }
            }
        }
        reach[a.len()][b.len()]
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

fn render(segs: &[Seg]) -> String {
    if segs.is_empty() {
        return "/".to_owned();
    }
    let mut out = String::new();
    for s in segs {
        out.push('/');
        out.push_str(match s {
            Seg::Lit(l) | Seg::Glob(l) => l,
            Seg::Any => "*",
            Seg::AnyDeep => "**",
        });
    }
    out
}

/// The segments of one concrete path, borrowed, on the stack (no allocation).
/// Split once per event, matched against every interested pattern.
pub struct PathSegments<'a> {
    items: [&'a str; MAX_SEGMENTS],
    len: usize,
}

impl<'a> PathSegments<'a> {
    /// The segments.
    pub fn as_slice(&self) -> &[&'a str] {
        &self.items[..self.len]
    }
}

/// Greedy wildcard matching over sequences, with `Seg::AnyDeep` as the
/// many-token wildcard of `pat`. At most len(pat) * len(text) calls of
/// `single`, and both are at most [`MAX_SEGMENTS`] (+ 1 for a pattern's
/// implied `**`) long; with the linear
/// [`glob_match`] inside `single`, a match costs at most about
/// `MAX_SEGMENTS * 2 * MAX_PATH_LEN` byte comparisons, whatever the input.
fn seq_match<T>(pat: &[Seg], text: &[T], single: impl Fn(&Seg, &T) -> bool) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pat.len() && pat[p] == Seg::AnyDeep {
            star = Some((p, t));
            p += 1;
        } else if p < pat.len() && single(&pat[p], &text[t]) {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|s| *s == Seg::AnyDeep)
}

/// Matches `text` against a glob where `*` is any run of characters.
///
/// Linear in `glob.len() + text.len()`, whatever the input: the glob is cut at
/// its stars into literal pieces; the first must start the text, the last must
/// end it, and each one between is found at its leftmost place after the one
/// before (with only `*` wildcards, leftmost is always right). The search is
/// `memchr::memmem`, which is linear in the worst case. Both sides can be
/// chosen by a client (a registration's glob, an event's path), so the
/// backtracking matcher this replaces, quadratic on `*aaaa…ab` against
/// `aaaa…a`, was a lever for slowing every delivery.
pub fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t) = (glob.as_bytes(), text.as_bytes());
    let Some(first_star) = memchr::memchr(b'*', g) else {
        return g == t;
    };
    let last_star = memchr::memrchr(b'*', g).unwrap_or(first_star);
    let (head, tail) = (&g[..first_star], &g[last_star + 1..]);
    if head.len() + tail.len() > t.len() || !t.starts_with(head) || !t.ends_with(tail) {
        return false;
    }
    // The pieces between the first and the last star, in the text between
    // the head and the tail.
    let mut rest = &t[head.len()..t.len() - tail.len()];
    let middle = g.get(first_star + 1..last_star).unwrap_or_default();
    for piece in middle.split(|b| *b == b'*') {
        if piece.is_empty() {
            continue;
        }
        match memchr::memmem::find(rest, piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Whether every text matched by glob `inner` is matched by glob `outer`
/// (sound approximation: `inner`'s `*` is matched only by `outer`'s `*`).
pub fn glob_covers(outer: &str, inner: &str) -> bool {
    // Treat inner's '*' as a literal that only outer's '*' may absorb: that is
    // plain glob matching, because outer's literals never equal '*'.
    glob_match(outer, inner)
}

/// Whether two globs match at least one common text.
pub fn glob_overlap(a: &str, b: &str) -> bool {
    match (a.contains('*'), b.contains('*')) {
        (false, false) => a == b,
        (true, false) => glob_match(a, b),
        (false, true) => glob_match(b, a),
        (true, true) => {
            // Both have a star: the middles absorb each other, so only the literal
            // prefixes (before the first star) and suffixes (after the last star)
            // must be compatible.
            let (pa, pb) = (prefix(a), prefix(b));
            let (sa, sb) = (suffix(a), suffix(b));
            (pa.starts_with(pb) || pb.starts_with(pa)) && (sa.ends_with(sb) || sb.ends_with(sa))
        }
    }
}

fn prefix(g: &str) -> &str {
    g.split('*').next().unwrap_or("")
}

fn suffix(g: &str) -> &str {
    g.rsplit('*').next().unwrap_or("")
}

fn seg_overlap(a: &Seg, b: &Seg) -> bool {
    match (a, b) {
        (Seg::AnyDeep, _) | (_, Seg::AnyDeep) => false, // handled by the caller
        (Seg::Any, _) | (_, Seg::Any) => true,
        (Seg::Lit(x), Seg::Lit(y)) => x == y,
        (Seg::Lit(x), Seg::Glob(g)) | (Seg::Glob(g), Seg::Lit(x)) => glob_match(g, x),
        (Seg::Glob(g), Seg::Glob(h)) => glob_overlap(g, h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SecretPath {
        SecretPath::parse(s).unwrap()
    }
    fn exact(s: &str) -> PathPattern {
        PathPattern::parse_exact(s).unwrap()
    }
    fn sub(s: &str) -> PathPattern {
        PathPattern::parse_subscription(s).unwrap()
    }

    #[test]
    fn concrete_paths_are_normalized_or_refused() {
        assert!(SecretPath::parse("/").is_ok());
        assert!(SecretPath::parse("/apps/db").is_ok());
        assert!(SecretPath::parse("/ünïcode/ok space").is_ok());
        assert_eq!(SecretPath::parse("apps"), Err(PathError::NotAbsolute));
        assert_eq!(SecretPath::parse(""), Err(PathError::NotAbsolute));
        assert_eq!(SecretPath::parse("/apps/"), Err(PathError::EmptySegment));
        assert_eq!(SecretPath::parse("//apps"), Err(PathError::EmptySegment));
        assert_eq!(SecretPath::parse("/apps/../x"), Err(PathError::DotSegment));
        assert_eq!(SecretPath::parse("/./x"), Err(PathError::DotSegment));
        assert_eq!(SecretPath::parse("/a\nb"), Err(PathError::ControlChar));
        assert_eq!(SecretPath::parse("/a\u{7f}"), Err(PathError::ControlChar));
        assert!(SecretPath::parse("/a/*").is_ok());
        assert!(!exact("/a/b").matches(&p("/a/*")));
        assert!(exact("/a/*").matches(&p("/a/*")));
        let long = format!("/{}", "a".repeat(1024));
        assert_eq!(SecretPath::parse(&long), Err(PathError::TooLong));
        let deep = "/a".repeat(33);
        assert_eq!(SecretPath::parse(&deep), Err(PathError::TooManySegments));
        assert!(SecretPath::parse(&"/a".repeat(32)).is_ok());
    }

    #[test]
    fn plain_subscription_path_is_folder_and_below() {
        let pat = sub("/apps");
        assert_eq!(pat.as_str(), "/apps/**");
        assert!(pat.matches(&p("/apps")));
        assert!(pat.matches(&p("/apps/db")));
        assert!(pat.matches(&p("/apps/db/x/y")));
        assert!(!pat.matches(&p("/apps2")));
        assert!(!pat.matches(&p("/")));
        assert!(sub("/").matches(&p("/")));
        assert!(sub("/").matches(&p("/a/b")));
    }

    #[test]
    fn exact_policy_path_is_only_that_folder() {
        assert!(exact("/apps").matches(&p("/apps")));
        assert!(!exact("/apps").matches(&p("/apps/db")));
        assert!(exact("/apps/**").matches(&p("/apps")));
        assert!(exact("/**").matches(&p("/")));
    }

    #[test]
    fn single_star_and_deep_globs() {
        assert!(exact("/apps/*").matches(&p("/apps/db")));
        assert!(!exact("/apps/*").matches(&p("/apps")));
        assert!(!exact("/apps/*").matches(&p("/apps/db/x")));
        assert!(exact("/apps/*/creds").matches(&p("/apps/db/creds")));
        assert!(exact("/apps/**/creds").matches(&p("/apps/creds")));
        assert!(exact("/apps/**/creds").matches(&p("/apps/a/b/creds")));
        assert!(!exact("/apps/**/creds").matches(&p("/apps/a/b/creds2")));
        assert!(exact("/apps/db-*").matches(&p("/apps/db-main")));
        assert!(!exact("/apps/db-*").matches(&p("/apps/cache")));
        assert_eq!(exact("/a/**/**/b").as_str(), "/a/**/b");
    }

    #[test]
    fn covers_and_overlaps() {
        assert!(exact("/**").covers(&sub("/apps")));
        assert!(exact("/apps/**").covers(&sub("/apps/db")));
        assert!(!exact("/apps/db/**").covers(&sub("/apps")));
        assert!(exact("/apps/db/**").overlaps(&sub("/apps")));
        assert!(!exact("/other/**").overlaps(&sub("/apps")));
        assert!(exact("/apps/*").overlaps(&exact("/*/db")));
        assert!(exact("/apps/db-*").overlaps(&exact("/apps/*-main")));
        assert!(!exact("/apps/db-*").overlaps(&exact("/apps/cache-*")));
        assert!(!exact("/apps").covers(&sub("/apps")));
        assert!(exact("/apps/*").covers(&exact("/apps/db-*")));
        assert!(!exact("/apps/db-*").covers(&exact("/apps/*")));
    }

    /// The quadratic reference: every split of the text tried.
    fn glob_reference(g: &[u8], t: &[u8]) -> bool {
        match g.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| glob_reference(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && glob_reference(rest, &t[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn glob_match_agrees_with_the_reference(g in "[ab*]{0,8}", t in "[ab]{0,10}") {
            proptest::prop_assert_eq!(glob_match(&g, &t), glob_reference(g.as_bytes(), t.as_bytes()));
        }
    }

    #[test]
    fn glob_edges() {
        assert!(glob_match("*", ""));
        assert!(glob_match("**", "abc"));
        assert!(!glob_match("a*a", "a"));
        assert!(glob_match("a*a", "aa"));
        assert!(glob_match("*ab*ab*", "xabab"));
        assert!(!glob_match("*ab*ab*", "xab"));
        assert!(glob_match("db-*", "db-"));
        // The adversarial case: a client's `*aaaa…ab` against a long segment.
        let g = format!("*{}b", "a".repeat(1000));
        assert!(!glob_match(&g, &"a".repeat(1000)));
        assert!(glob_match(&g, &format!("{}b", "a".repeat(1500))));
    }

    #[test]
    fn glob_overlap_rules() {
        assert!(glob_overlap("a*", "*b"));
        assert!(glob_overlap("ab*", "a*"));
        assert!(!glob_overlap("ab*", "ac*"));
        assert!(!glob_overlap("*x", "*y"));
        assert!(glob_overlap("prod", "pro*"));
    }
}
