//! `herald policy explain`: which lines decide a request, and through which roles.
//!
//! The explanation walks the validated lines with the same match functions the
//! casbin matcher calls, and states whether casbin's own verdict agrees, so an
//! operator sees the file and line of every rule that applied.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;

use crate::event::EventKey;
use crate::ident::Principal;
use crate::path::{glob_match, PathPattern};

use super::{casbin_identity, casbin_name, Action, PolicySet};

/// One policy line that applied, with how the identity reached its subject.
#[derive(Debug, Clone)]
pub struct AppliedRule {
    /// 1-based line in the policy file.
    pub line: usize,
    /// The rule as written (normalized).
    pub text: String,
    /// identity -> role -> ... -> the rule's subject, with each link's line and domain.
    pub chain: Vec<String>,
}

/// The answer to one explained request.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The verdict.
    pub allowed: bool,
    /// Whether casbin's evaluation gave the same verdict (it always should).
    pub casbin_agrees: bool,
    /// Matching deny rules.
    pub denies: Vec<AppliedRule>,
    /// Matching allow rules.
    pub allows: Vec<AppliedRule>,
    /// The policy file.
    pub file: String,
    /// The request, for display.
    pub request: String,
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.allowed { "allow" } else { "deny" };
        writeln!(f, "{verdict}: {}", self.request)?;
        let show = |f: &mut std::fmt::Formatter<'_>, r: &AppliedRule| -> std::fmt::Result {
            writeln!(f, "    {}:{}: {}", self.file, r.line, r.text)?;
            if r.chain.len() > 1 {
                writeln!(f, "      via {}", r.chain.join(" -> "))?;
            }
            Ok(())
        };
        if !self.denies.is_empty() {
            writeln!(f, "  decided by deny rule(s):")?;
            for r in &self.denies {
                show(f, r)?;
            }
            if !self.allows.is_empty() {
                writeln!(f, "  allow rule(s) that also matched (deny wins):")?;
                for r in &self.allows {
                    show(f, r)?;
                }
            }
        } else if !self.allows.is_empty() {
            writeln!(f, "  decided by allow rule(s):")?;
            for r in &self.allows {
                show(f, r)?;
            }
        } else {
            writeln!(f, "  no rule matches: denied by default")?;
        }
        if !self.casbin_agrees {
            writeln!(f, "  warning: casbin's own evaluation disagrees; the model file may have been changed")?;
        }
        Ok(())
    }
}

impl PolicySet {
    /// Explains the decision for one concrete request.
    pub fn explain(&self, identity: &Principal, key: &EventKey, act: Action) -> Explanation {
        let (project, ty, env, path) = (&key.project, key.event_type, &key.env, &key.path);
        // casbin's matcher: g(sub, p.sub, project) || g(sub, p.sub, "*"): a chain of
        // links all in the project's domain, or all in the `*` domain.
        let chains_project = self.reachable(identity, project.as_str());
        let chains_any = self.reachable(identity, "*");
        let mut denies = Vec::new();
        let mut allows = Vec::new();
        for (rule, &line) in self.parsed.rules.iter().zip(&self.parsed.rule_lines) {
            let subject = casbin_name(&rule[0]);
            let chain = match chains_project
                .get(subject.as_str())
                .or_else(|| chains_any.get(subject.as_str()))
            {
                Some(c) => c.clone(),
                None => continue,
            };
            let matches = glob_match(&rule[1], project.as_str())
                && glob_match(&rule[2], ty.name())
                && rule[3] == act.as_str()
                && glob_match(&rule[4], env.as_str())
                && PathPattern::parse_exact(&rule[5]).is_ok_and(|p| p.matches(path));
            if !matches {
                continue;
            }
            let applied = AppliedRule {
                line,
                text: format!("p, {}", rule.join(", ")),
                chain,
            };
            if rule[6] == "deny" {
                denies.push(applied);
            } else {
                allows.push(applied);
            }
        }
        let allowed = denies.is_empty() && !allows.is_empty();
        let casbin = self.decide(identity, key, act);
        Explanation {
            allowed,
            casbin_agrees: casbin == allowed,
            denies,
            allows,
            file: self.policy_name.clone(),
            request: format!("{identity} {} {key}", act.as_str()),
        }
    }

    /// Every policy subject the identity `sub` acts as within `domain`, keyed
    /// as casbin names them (identities and roles apart), with the chain that
    /// leads there as the file writes it.
    /// Roles a token's claims give the identity are reached from it directly.
    fn reachable(&self, identity: &Principal, domain: &str) -> HashMap<String, Vec<String>> {
        let sub = identity.identity();
        let mut edges: HashMap<String, Vec<(String, &str, usize)>> = HashMap::new();
        for (l, &line) in self.parsed.links.iter().zip(&self.parsed.link_lines) {
            if l[2] == domain {
                edges.entry(casbin_name(&l[0])).or_default().push((
                    casbin_name(&l[1]),
                    l[1].as_str(),
                    line,
                ));
            }
        }
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        let start = casbin_identity(sub);
        out.insert(start.clone(), vec![sub.to_owned()]);
        let mut queue = VecDeque::from([start]);
        for role in identity.claimed_roles() {
            let chain = vec![sub.to_owned(), format!("{role} (from the token's claims)")];
            if out.insert(casbin_name(role), chain).is_none() {
                queue.push_back(casbin_name(role));
            }
        }
        while let Some(cur) = queue.pop_front() {
            let base = out.get(&cur).cloned().unwrap_or_default();
            for (role, shown, line) in edges.get(cur.as_str()).into_iter().flatten() {
                if out.contains_key(role) {
                    continue;
                }
                let mut chain = base.clone();
                let mut step = String::new();
                let _ = write!(step, "{shown} (line {line}, domain {domain})");
                chain.push(step);
                out.insert(role.clone(), chain);
                queue.push_back(role.clone());
            }
        }
        out
    }
}
