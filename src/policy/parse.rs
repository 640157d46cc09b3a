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
        let fields: Vec<String> = trimmed.split(',').map(|f| f.trim().to_owned()).collect();
        let parsed = if trimmed.contains('"') {
            Err(vec![
                "quotes are not supported in herald policies".to_owned()
            ])
        } else {
            match fields[0].as_str() {
                "p" => rule(&fields[1..]).map(|r| ("p", r)),
                "g" => link(&fields[1..]).map(|l| ("g", l)),
                other => Err(vec![format!(
                    "unknown policy type {other:?}: herald policies have `p` and `g` lines"
                )]),
            }
        };
        match parsed {
            Err(messages) => {
                problems.extend(messages.into_iter().map(|m| Problem::new(name, line, m)));
            }
            // Lines are deduplicated: casbin refuses a whole batch with a repeat.
            Ok((kind, fields)) if seen.insert((kind, fields.clone())) => {
                let (list, lines) = if kind == "p" {
                    (&mut out.rules, &mut out.rule_lines)
                } else {
                    (&mut out.links, &mut out.link_lines)
                };
                list.push(fields);
                lines.push(line);
            }
            Ok(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// A `p` line's fields (after `p`), normalized, or every problem with them.
fn rule(f: &[String]) -> Result<Vec<String>, Vec<String>> {
    if f.len() != 7 {
        return Err(vec![format!(
            "a `p` line has 7 fields (subject, project, event type, action, environment, path, allow|deny); found {}",
            f.len()
        )]);
    }
    let mut problems = Vec::new();
    if let Some(m) = subject_problem("subject", &f[0]) {
        problems.push(m);
    }
    if !is_pattern_ident(&f[1]) {
        problems.push(format!(
            "project {:?} must be `*` or a project id (A-Z a-z 0-9 _ -, `*` as wildcard)",
            f[1]
        ));
    }
    if !EVENT_TYPES.iter().any(|d| glob_match(&f[2], d.name)) {
        let known: Vec<&str> = EVENT_TYPES.iter().map(|d| d.name).collect();
        problems.push(format!(
            "event type {:?} matches no known event type ({})",
            f[2],
            known.join(", ")
        ));
    }
    if f[3] != "subscribe" && f[3] != "publish" {
        problems.push(format!(
            "action {:?} must be `subscribe` or `publish`",
            f[3]
        ));
    }
    if !is_pattern_ident(&f[4]) {
        problems.push(format!(
            "environment {:?} must be `*` or a slug (A-Z a-z 0-9 _ -, `*` as wildcard)",
            f[4]
        ));
    }
    let path = PathPattern::parse_exact(&f[5]);
    if let Err(e) = &path {
        problems.push(format!("path {:?}: {e}", f[5]));
    }
    if f[6] != "allow" && f[6] != "deny" {
        problems.push(format!("effect {:?} must be `allow` or `deny`", f[6]));
    }
    match path {
        Ok(p) if problems.is_empty() => {
            let mut r = f.to_vec();
            // Paths normalized, so `/a/**/**` and `/a/**` are one rule.
            r[5] = p.as_str().to_owned();
            Ok(r)
        }
        _ => Err(problems),
    }
}

/// A `g` line's fields (after `g`), or its problem.
fn link(f: &[String]) -> Result<Vec<String>, Vec<String>> {
    if f.len() != 3 {
        return Err(vec![format!(
            "a `g` line has 3 fields (member, role, project or *); found {}",
            f.len()
        )]);
    }
    let problem = if let Some(m) = subject_problem("member", &f[0]) {
        Some(m)
    } else if !is_role_name(&f[1]) || subject_problem("role", &f[1]).is_some() {
        Some(format!(
            "{:?} is not a role: the second field of a `g` line is a role, written `{ROLE_PREFIX}NAME`",
            f[1]
        ))
    } else if f[2] != "*" && ProjectId::parse(&f[2]).is_err() {
        Some(format!("domain {:?} must be a project id or `*`", f[2]))
    } else if f[0] == f[1] {
        Some(format!("{:?} cannot be a member of itself", f[0]))
    } else {
        None
    };
    match problem {
        Some(m) => Err(vec![m]),
        None => Ok(f.to_vec()),
    }
}
