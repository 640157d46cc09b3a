//! herald's casbin matcher functions: `projectMatch`, `typeMatch`, `envMatch`,
//! `pathMatch`. They never panic, whatever the input, unlike casbin's built-in
//! globs, and give `*`/`**` the documented path semantics.
//!
//! A registration (subscribe time) is passed as a pattern: its path carries the
//! [`PATTERN_MARK`] prefix and a missing environment is [`ANY_ENV`]. For those,
//! an `allow` rule applies when it overlaps the registration and a `deny` rule
//! when it covers the registration entirely.

use casbin::function_map::OperatorFunction;
use casbin::rhai::Dynamic;
use casbin::{CoreApi, Enforcer};

use crate::path::{glob_covers, glob_match, glob_overlap, PathPattern, SecretPath};

/// Marks a request path that is a pattern (a registration), not an event's path.
pub(crate) const PATTERN_MARK: &str = "pattern:";
/// The request environment of a registration without one.
pub(crate) const ANY_ENV: &str = "*";

fn dyn_str(d: &Dynamic) -> String {
    casbin::function_map::dynamic_to_str(d).into_owned()
}

fn f_project_match(req: Dynamic, pol: Dynamic) -> Dynamic {
    glob_match(&dyn_str(&pol), &dyn_str(&req)).into()
}

fn f_type_match(req: Dynamic, pol: Dynamic) -> Dynamic {
    glob_match(&dyn_str(&pol), &dyn_str(&req)).into()
}

fn f_env_match(req: Dynamic, pol: Dynamic, eft: Dynamic) -> Dynamic {
    let (req, pol) = (dyn_str(&req), dyn_str(&pol));
    if req == ANY_ENV {
        // A registration for every environment.
        return if dyn_str(&eft) == "deny" {
            glob_covers(&pol, &req)
        } else {
            glob_overlap(&pol, &req)
        }
        .into();
    }
    glob_match(&pol, &req).into()
}

fn f_path_match(req: Dynamic, pol: Dynamic, eft: Dynamic) -> Dynamic {
    let (req, pol) = (dyn_str(&req), dyn_str(&pol));
    let deny = dyn_str(&eft) == "deny";
    let Ok(pol) = PathPattern::parse_exact(&pol) else {
        // The policy loader refuses such lines; never reached with a loaded policy.
        return false.into();
    };
    if let Some(pat) = req.strip_prefix(PATTERN_MARK) {
        // A request herald cannot read is denied: every deny rule applies, no allow.
        let Ok(pat) = PathPattern::parse_rendered(pat) else {
            return deny.into();
        };
        return if deny {
            pol.covers(&pat)
        } else {
            pol.overlaps(&pat)
        }
        .into();
    }
    match SecretPath::parse(&req) {
        Ok(p) => pol.matches(&p).into(),
        Err(_) => deny.into(),
    }
}

/// Registers the functions on a fresh enforcer.
pub(crate) fn register(enforcer: &mut Enforcer) {
    enforcer.add_function("projectMatch", OperatorFunction::Arg2(f_project_match));
    enforcer.add_function("typeMatch", OperatorFunction::Arg2(f_type_match));
    enforcer.add_function("envMatch", OperatorFunction::Arg3(f_env_match));
    enforcer.add_function("pathMatch", OperatorFunction::Arg3(f_path_match));
}
