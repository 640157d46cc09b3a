//! Reading and validating policy files, line by line.
//!
//! Every problem is reported with its file and line; only a policy without any
//! problem is handed to casbin. Lines are normalized and deduplicated, because
//! casbin's `add_policies` refuses a whole batch when one rule repeats.

use crate::event::EVENT_TYPES;
use crate::ident::{is_role_name, looks_like_role, ProjectId, ROLE_PREFIX};
use crate::path::{glob_match, PathPattern};

use super::Problem;

/// A parsed policy: `p` rules and `g` role links, deduplicated, in file order.
#[derive(Debug, Default)]
pub(crate) struct ParsedPolicy {
    /// `p` rules: subject, project, type, action, environment, path, effect.
    pub rules: Vec<Vec<String>>,
    /// The line of each rule.
    pub rule_lines: Vec<usize>,
    /// `g` links: member, role, domain.
    pub links: Vec<Vec<String>>,
    /// The line of each link.
    pub link_lines: Vec<usize>,
}

fn is_pattern_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'*')
}

fn is_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == ',')
}

/// What is wrong with `name` in a place that takes an identity or a role, if
/// anything: a role is `role:NAME`; an identity may not look like a role
/// (no token could ever carry it, and a reader would take it for one).
fn subject_problem(what: &str, name: &str) -> Option<String> {
    if !is_subject(name) {
        return Some(format!(
            "{what} {name:?} must be non-empty without spaces or control characters"
        ));
    }
    if is_role_name(name) {
        return (name.len() == ROLE_PREFIX.len())
            .then(|| format!("{what} {name:?}: a role needs a name after `{ROLE_PREFIX}`"));
    }
    looks_like_role(name).then(|| {
        format!(
            "{what} {name:?} is an identity shaped like a role: roles are written `{ROLE_PREFIX}NAME`, and no token may name an identity like this"
        )
    })
}

/// Parses and validates a policy text; every problem is reported with its line.
pub(crate) fn parse_policy(name: &str, text: &str) -> Result<ParsedPolicy, Vec<Problem>> {
    let mut out = ParsedPolicy::default();
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if trimmed.contains('"') {
            problems.push(Problem::new(
                name,
                line,
                "quotes are not supported in herald policies",
            ));
            continue;
        }
        let fields: Vec<String> = trimmed.split(',').map(|f| f.trim().to_owned()).collect();
        let mut err = |m: String| problems.push(Problem::new(name, line, m));
        match fields[0].as_str() {
            "p" => {
                if fields.len() != 8 {
                    err(format!(
                        "a `p` line has 7 fields (subject, project, event type, action, environment, path, allow|deny); found {}",
                        fields.len() - 1
                    ));
                    continue;
                }
                let f = &fields[1..];
                let before = problems.len();
                let mut err = |m: String| problems.push(Problem::new(name, line, m));
                if let Some(m) = subject_problem("subject", &f[0]) {
                    err(m);
                }
                if !is_pattern_ident(&f[1]) {
                    err(format!("project {:?} must be `*` or a project id (A-Z a-z 0-9 _ -, `*` as wildcard)", f[1]));
                }
                if !EVENT_TYPES.iter().any(|d| glob_match(&f[2], d.name)) {
                    err(format!(
                        "event type {:?} matches no known event type ({})",
                        f[2],
                        EVENT_TYPES
                            .iter()
                            .map(|d| d.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if f[3] != "subscribe" && f[3] != "publish" {
                    err(format!(
                        "action {:?} must be `subscribe` or `publish`",
                        f[3]
                    ));
                }
                if !is_pattern_ident(&f[4]) {
                    err(format!(
                        "environment {:?} must be `*` or a slug (A-Z a-z 0-9 _ -, `*` as wildcard)",
                        f[4]
                    ));
                }
                if let Err(e) = PathPattern::parse_exact(&f[5]) {
                    err(format!("path {:?}: {e}", f[5]));
                }
                if f[6] != "allow" && f[6] != "deny" {
                    err(format!("effect {:?} must be `allow` or `deny`", f[6]));
                }
                if problems.len() == before {
                    let mut rule = f.to_vec();
                    // Store paths normalized, so `/a/**/**` and `/a/**` are one rule.
                    if let Ok(p) = PathPattern::parse_exact(&rule[5]) {
                        rule[5] = p.as_str().to_owned();
                    }
                    if seen.insert(("p", rule.clone())) {
                        out.rules.push(rule);
                        out.rule_lines.push(line);
                    }
                }
            }
            "g" => {
                if fields.len() != 4 {
                    err(format!(
                        "a `g` line has 3 fields (member, role, project or *); found {}",
                        fields.len() - 1
                    ));
                    continue;
                }
                let f = &fields[1..];
                if let Some(m) = subject_problem("member", &f[0]) {
                    err(m);
                    continue;
                }
                if !is_role_name(&f[1]) || subject_problem("role", &f[1]).is_some() {
                    err(format!(
                        "{:?} is not a role: the second field of a `g` line is a role, written `{ROLE_PREFIX}NAME`",
                        f[1]
                    ));
                    continue;
                }
                if f[2] != "*" && ProjectId::parse(&f[2]).is_err() {
                    err(format!("domain {:?} must be a project id or `*`", f[2]));
                    continue;
                }
                if f[0] == f[1] {
                    err(format!("{:?} cannot be a member of itself", f[0]));
                    continue;
                }
                if seen.insert(("g", f.to_vec())) {
                    out.links.push(f.to_vec());
                    out.link_lines.push(line);
                }
            }
            other => err(format!(
                "unknown policy type {other:?}: herald policies have `p` and `g` lines"
            )),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}
