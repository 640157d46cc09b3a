//! casbin's role manager, taught the roles a token's claims give a request.
//!
//! A request's subject is its identity, followed by each claimed role after
//! a [`ROLE_SEPARATOR`] (`Principal::with_roles`). `g(r.sub, p.sub, dom)`
//! holds when the identity or any claimed role holds it, so the rules of
//! those roles (and of the roles they inherit) apply to the request, deny
//! rules included: the effect is computed over all of them at once. Nothing
//! else changes: the links of the policy file are casbin's own.

use casbin::{DefaultRoleManager, MatchingFn, RoleManager};

use crate::ident::ROLE_SEPARATOR;

/// casbin's [`DefaultRoleManager`], reading claimed roles in a subject.
pub(crate) struct ClaimedRoles(DefaultRoleManager);

impl ClaimedRoles {
    /// With casbin's default hierarchy depth.
    pub(crate) fn new() -> Self {
        Self(DefaultRoleManager::new(10))
    }
}

impl RoleManager for ClaimedRoles {
    fn clear(&mut self) {
        self.0.clear();
    }

    fn add_link(&mut self, name1: &str, name2: &str, domain: Option<&str>) {
        self.0.add_link(name1, name2, domain);
    }

    fn matching_fn(&mut self, role: Option<MatchingFn>, domain: Option<MatchingFn>) {
        self.0.matching_fn(role, domain);
    }

    fn delete_link(
        &mut self,
        name1: &str,
        name2: &str,
        domain: Option<&str>,
    ) -> casbin::Result<()> {
        self.0.delete_link(name1, name2, domain)
    }

    fn has_link(&self, name1: &str, name2: &str, domain: Option<&str>) -> bool {
        if !name1.contains(ROLE_SEPARATOR) {
            return self.0.has_link(name1, name2, domain);
        }
        name1
            .split(ROLE_SEPARATOR)
            .any(|part| self.0.has_link(part, name2, domain))
    }

    fn get_roles(&self, name: &str, domain: Option<&str>) -> Vec<String> {
        let mut parts = name.split(ROLE_SEPARATOR);
        let mut roles = parts
            .next()
            .map(|id| self.0.get_roles(id, domain))
            .unwrap_or_default();
        roles.extend(parts.map(str::to_owned));
        roles
    }

    fn get_users(&self, name: &str, domain: Option<&str>) -> Vec<String> {
        self.0.get_users(name, domain)
    }
}
