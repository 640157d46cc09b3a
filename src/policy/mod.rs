//! casbin authorization: loading, validating, deciding, caching.
//!
//! The policy in force is an immutable [`PolicySet`] (a compiled casbin enforcer
//! plus its generation and fingerprint) behind an `Arc` that is swapped whole.
//! Every line is validated by herald before casbin sees it, and the matcher calls
//! herald's own never-panicking `projectMatch`, `typeMatch`, `envMatch` and
//! `pathMatch` functions instead of casbin's built-in globs.
//!
//! Two stages ask: subscribe time, with a registration that may itself be a
//! pattern (allowed when an allow rule overlaps it and no deny rule covers it
//! whole), and delivery time, with an event's concrete values. Delivery-time
//! answers are cached per (generation, identity, project, type, env, path); the
//! generation in the key means an answer of an old policy can never serve a new
//! one. This module never blocks on I/O after loading and never panics on input.

mod cache;
pub mod explain;
mod functions;
mod parse;
pub mod reload;
mod roles;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use casbin::MemoryAdapter;
use casbin::{CoreApi, DefaultModel, Enforcer, MgmtApi};
use parking_lot::{Mutex, RwLock};

use crate::event::EventKey;
use crate::ident::{EnvSlug, Principal, ProjectId};
use crate::interest::Interest;
use crate::metrics::Metrics;

pub use reload::{PolicyFiles, Reloader};

use crate::setting::{self, Invalid};
use cache::{DecisionCache, Question};
use functions::{ANY_ENV, PATTERN_MARK};
use parse::{parse_policy, ParsedPolicy};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The model shipped in `policies/model.conf`, used when `--dev` finds no files.
pub const SHIPPED_MODEL: &str = include_str!("../../policies/model.conf");
/// The policy shipped in `policies/policy.csv`, used when `--dev` finds no files.
pub const SHIPPED_POLICY: &str = include_str!("../../policies/policy.csv");

/// The actions a policy line can grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Receive events.
    Subscribe,
    /// Send events.
    Publish,
}

impl Action {
    /// The action as the policy names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Subscribe => "subscribe",
            Action::Publish => "publish",
        }
    }
}

/// Where the model and policy text come from.
#[derive(Clone, Debug)]
pub struct PolicySource {
    /// Name of the model file, for messages.
    pub model_name: String,
    /// Model text.
    pub model: String,
    /// Name of the policy file, for messages.
    pub policy_name: String,
    /// Policy text.
    pub policy: String,
    /// The files it was read from; `None` for the built-in copy.
    pub files: Option<PolicyFiles>,
}

impl PolicySource {
    /// Reads both files.
    pub fn read(model: &Path, policy: &Path) -> Result<Self, Vec<Problem>> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| {
                vec![Problem::new(
                    p.display().to_string(),
                    0,
                    format!("cannot read: {e}"),
                )]
            })
        };
        Ok(Self {
            model_name: model.display().to_string(),
            model: read(model)?,
            policy_name: policy.display().to_string(),
            policy: read(policy)?,
            files: Some(PolicyFiles {
                model: model.to_path_buf(),
                policy: policy.to_path_buf(),
            }),
        })
    }

    /// The policy shipped with herald.
    pub fn shipped() -> Self {
        Self {
            model_name: "<shipped policies/model.conf>".into(),
            model: SHIPPED_MODEL.into(),
            policy_name: "<shipped policies/policy.csv>".into(),
            policy: SHIPPED_POLICY.into(),
            files: None,
        }
    }
}

/// One problem found in a policy, with its place.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// File name.
    pub file: String,
    /// 1-based line, or 0 for the whole file.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    fn new(file: impl Into<String>, line: usize, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

/// Every problem of a refused policy, one per line (`file:line: message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A compiled, validated policy.
pub struct PolicySet {
    enforcer: Enforcer,
    /// Increases by one on every successful load.
    pub generation: u64,
    /// Hash of the normalized model and policy (FNV-1a 64, hex).
    pub fingerprint: String,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// The validated lines, for `explain`.
    parsed: ParsedPolicy,
    /// The policy file name, for `explain`.
    policy_name: String,
}

impl PolicySet {
    /// Compiles a policy from text, validating everything first.
    pub async fn compile(src: &PolicySource, generation: u64) -> Result<PolicySet, Vec<Problem>> {
        let parsed = parse_policy(&src.policy_name, &src.policy)?;
        let model = DefaultModel::from_str(&src.model).await.map_err(|e| {
            vec![Problem::new(
                &src.model_name,
                0,
                format!("model does not compile: {e}"),
            )]
        })?;
        let mut enforcer = Enforcer::new(model, MemoryAdapter::default())
            .await
            .map_err(|e| {
                vec![Problem::new(
                    &src.model_name,
                    0,
                    format!("model does not compile: {e}"),
                )]
            })?;
        let rm = std::sync::Arc::new(parking_lot::RwLock::new(roles::ClaimedRoles::new()));
        enforcer.set_role_manager(rm).map_err(|e| {
            vec![Problem::new(
                &src.model_name,
                0,
                format!("model does not compile: {e}"),
            )]
        })?;
        functions::register(&mut enforcer);
        if !parsed.rules.is_empty() {
            enforcer
                .add_policies(parsed.rules.iter().map(|r| casbin_rule(r)).collect())
                .await
                .map_err(|e| {
                    vec![Problem::new(
                        &src.policy_name,
                        0,
                        format!("casbin refused the rules: {e}"),
                    )]
                })?;
        }
        if !parsed.links.is_empty() {
            enforcer
                .add_grouping_policies(parsed.links.iter().map(|l| casbin_link(l)).collect())
                .await
                .map_err(|e| {
                    vec![Problem::new(
                        &src.policy_name,
                        0,
                        format!("casbin refused the roles: {e}"),
                    )]
                })?;
        }
        // The model must take herald's request shape: probe it once.
        let probe = ("probe", "p", "secret:created", "subscribe", "prod", "/");
        if let Err(e) = enforcer.enforce(probe) {
            return Err(vec![Problem::new(
                &src.model_name,
                0,
                format!(
                    "model cannot evaluate a herald request (sub, proj, typ, act, env, path): {e}"
                ),
            )]);
        }
        Ok(PolicySet {
            enforcer,
            generation,
            fingerprint: fingerprint(&src.model, &parsed),
            loaded_at: SystemTime::now(),
            parsed,
            policy_name: src.policy_name.clone(),
        })
    }

    /// Number of `p` rules and `g` links.
    pub fn size(&self) -> (usize, usize) {
        (self.parsed.rules.len(), self.parsed.links.len())
    }

    fn enforce(
        &self,
        sub: &str,
        proj: &str,
        typ: &str,
        act: Action,
        env: &str,
        path: &str,
    ) -> bool {
        // The requester is an identity, whatever its name looks like.
        let sub = casbin_identity(sub);
        match self
            .enforcer
            .enforce((sub.as_str(), proj, typ, act.as_str(), env, path))
        {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "policy evaluation failed; denying");
                false
            }
        }
    }

    /// Whether `identity` may subscribe to `interest` in `project`.
    pub fn may_subscribe(
        &self,
        identity: &Principal,
        project: &ProjectId,
        interest: &Interest,
    ) -> bool {
        let env = interest
            .env
            .as_ref()
            .map(EnvSlug::as_str)
            .unwrap_or(ANY_ENV);
        let path = format!("{PATTERN_MARK}{}", interest.path);
        self.enforce(
            identity.as_str(),
            project.as_str(),
            interest.event_type.name(),
            Action::Subscribe,
            env,
            &path,
        )
    }

    /// Decides one concrete request.
    pub fn decide(&self, identity: &Principal, key: &EventKey, act: Action) -> bool {
        self.enforce(
            identity.as_str(),
            key.project.as_str(),
            key.event_type.name(),
            act,
            key.env.as_str(),
            key.path.as_str(),
        )
    }
}

/// The prefix of every identity as casbin sees it.
const IDENTITY_NAMESPACE: &str = "id:";

/// A policy name as casbin sees it: roles (`role:…`) as written, every other
/// name (an identity) in the `id:` namespace. A request's identity is always
/// in that namespace, so it can never equal a role, whatever the token said
/// and whatever casbin's role manager does with equal names (it links every
/// name to itself).
pub(crate) fn casbin_name(name: &str) -> String {
    if crate::ident::is_role_name(name) {
        name.to_owned()
    } else {
        format!("{IDENTITY_NAMESPACE}{name}")
    }
}

/// A request's identity as casbin sees it (never a role, see [`casbin_name`]).
pub(crate) fn casbin_identity(identity: &str) -> String {
    format!("{IDENTITY_NAMESPACE}{identity}")
}

fn casbin_rule(rule: &[String]) -> Vec<String> {
    let mut r = rule.to_vec();
    r[0] = casbin_name(&r[0]);
    r
}

fn casbin_link(link: &[String]) -> Vec<String> {
    vec![
        casbin_name(&link[0]),
        casbin_name(&link[1]),
        link[2].clone(),
    ]
}

/// The policy's fingerprint: FNV-1a over the model's meaningful lines and
/// the sorted normalized rules and links, the same on every instance that
/// loaded the same policy, whatever the order or comments of its files.
fn fingerprint(model: &str, parsed: &ParsedPolicy) -> String {
    let mut norm: Vec<String> = parsed
        .rules
        .iter()
        .chain(parsed.links.iter())
        .map(|r| r.join(","))
        .collect();
    norm.sort();
    let mut h = Fnv::new();
    let model_lines = model
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    for l in model_lines.chain(norm.iter().map(String::as_str)) {
        h.write(l.as_bytes());
        h.write(b"\n");
    }
    format!("{:016x}", h.0)
}

/// FNV-1a, 64 bit: a stable fingerprint across processes and versions.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf29ce484222325)
    }
    fn write(&mut self, b: &[u8]) {
        for x in b {
            self.0 ^= *x as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
/// The state of the policy in force, for `/admin/policy`.
#[derive(serde::Serialize)]
pub struct PolicyStatus {
    /// Generation in force.
    pub generation: u64,
    /// Fingerprint in force.
    pub fingerprint: String,
    /// When the policy in force was loaded (RFC 3339).
    pub loaded_at: String,
    /// Rules and role links in force.
    pub rules: usize,
    /// Role links in force.
    pub role_links: usize,
    /// Files it was read from.
    pub model_file: String,
    /// Policy file.
    pub policy_file: String,
    /// Problems of the last failed load, if the last load failed.
    pub last_error: Option<Vec<String>>,
}

/// The policy in force and the decision cache in front of it.
pub struct Authorizer {
    current: RwLock<Arc<PolicySet>>,
    cache: DecisionCache,
    cache_hits: prometheus::IntCounter,
    cache_misses: prometheus::IntCounter,
    metrics: Arc<Metrics>,
    next_generation: AtomicU64,
    generation: AtomicU64,
    last_error: Mutex<Option<Vec<Problem>>>,
    files: (String, String),
}

impl Authorizer {
    /// Compiles the first policy.
    pub async fn new(
        src: &PolicySource,
        cache_size: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Vec<Problem>> {
        let set = PolicySet::compile(src, 1).await.inspect_err(|_| {
            metrics.policy_reloads.with_label_values(&["error"]).inc();
        })?;
        metrics.policy_reloads.with_label_values(&["success"]).inc();
        metrics.policy_generation.set(1);
        Ok(Self {
            current: RwLock::new(Arc::new(set)),
            cache: DecisionCache::new(cache_size),
            cache_hits: metrics.decision_cache.with_label_values(&["hit"]),
            cache_misses: metrics.decision_cache.with_label_values(&["miss"]),
            metrics,
            next_generation: AtomicU64::new(2),
            generation: AtomicU64::new(1),
            last_error: Mutex::new(None),
            files: (src.model_name.clone(), src.policy_name.clone()),
        })
    }

    /// The generation in force (one atomic load: the write-time check's fast path).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.read().clone()
    }

    /// Compiles `src` and, only if it is fully valid, swaps it in. On error the
    /// previous policy stays in force and the problems are kept for `status`.
    pub async fn reload(&self, src: &PolicySource) -> Result<Arc<PolicySet>, Vec<Problem>> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        match PolicySet::compile(src, generation).await {
            Ok(set) => {
                let set = Arc::new(set);
                {
                    let mut cur = self.current.write();
                    *cur = set.clone();
                    self.generation.store(generation, Ordering::Release);
                }
                self.cache.clear();
                *self.last_error.lock() = None;
                self.metrics
                    .policy_reloads
                    .with_label_values(&["success"])
                    .inc();
                self.metrics.policy_generation.set(generation as i64);
                Ok(set)
            }
            Err(p) => {
                self.metrics
                    .policy_reloads
                    .with_label_values(&["error"])
                    .inc();
                *self.last_error.lock() = Some(p.clone());
                Err(p)
            }
        }
    }

    /// Records a load that failed before compiling (a file could not be read).
    pub fn record_failure(&self, problems: Vec<Problem>) {
        self.metrics
            .policy_reloads
            .with_label_values(&["error"])
            .inc();
        *self.last_error.lock() = Some(problems);
    }

    /// Whether `identity` may receive this concrete event (cached).
    pub fn may_receive(&self, identity: &Principal, key: &EventKey) -> bool {
        self.may(identity, key, Action::Subscribe)
    }

    /// Decides one concrete request, from the cache when it can.
    pub fn may(&self, identity: &Principal, key: &EventKey, action: Action) -> bool {
        let set = self.current();
        let q = Question {
            generation: set.generation,
            identity,
            key,
            action,
        };
        if let Some(v) = self.cache.get(&q) {
            self.cache_hits.inc();
            return v;
        }
        self.cache_misses.inc();
        let v = set.decide(identity, key, action);
        self.cache.put(&q, v);
        v
    }

    /// The status shown on `/admin/policy`.
    pub fn status(&self) -> PolicyStatus {
        let set = self.current();
        let loaded_at = crate::event::rfc3339(set.loaded_at);
        PolicyStatus {
            generation: set.generation,
            fingerprint: set.fingerprint.clone(),
            loaded_at,
            rules: set.size().0,
            role_links: set.size().1,
            model_file: self.files.0.clone(),
            policy_file: self.files.1.clone(),
            last_error: self
                .last_error
                .lock()
                .as_ref()
                .map(|v| v.iter().map(|p| p.to_string()).collect()),
        }
    }
}

/// `[policy]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// casbin model file.
    pub model: PathBuf,
    /// casbin policy file.
    pub policy: PathBuf,
    /// Most cached delivery-time decisions.
    pub cache_size: usize,
    /// Reload when the files change (SIGHUP always reloads).
    pub watch: bool,
    /// How often the files are checked for changes.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::from("policies/model.conf"),
            policy: PathBuf::from("policies/policy.csv"),
            cache_size: 100_000,
            watch: true,
            watch_interval: Duration::from_millis(250),
        }
    }
}

impl PolicyConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        setting::duration(
            "policy.watch_interval",
            self.watch_interval,
            Duration::from_millis(10),
            setting::MAX_DURATION,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::path::{PathPattern, SecretPath};

    fn src(policy: &str) -> PolicySource {
        PolicySource {
            model_name: "model.conf".into(),
            model: SHIPPED_MODEL.into(),
            policy_name: "policy.csv".into(),
            policy: policy.into(),
            files: None,
        }
    }

    fn interest(ty: &str, env: Option<&str>, path: &str) -> Interest {
        Interest {
            event_type: EventType::parse(ty).unwrap(),
            env: env.map(|e| EnvSlug::parse(e).unwrap()),
            path: PathPattern::parse_subscription(path).unwrap(),
        }
    }

    fn p(s: &str) -> ProjectId {
        ProjectId::parse(s).unwrap()
    }

    /// A delivery-time decision for any name as the identity, even one no
    /// principal could carry (what reaches casbin is tested, not the parser).
    fn decide(set: &PolicySet, sub: &str, proj: &str, env: &str, path: &str) -> bool {
        set.enforce(sub, proj, "secret:created", Action::Subscribe, env, path)
    }

    fn id(s: &str) -> Principal {
        Principal::parse(s).unwrap()
    }

    fn key(proj: &str, env: &str, path: &str) -> EventKey {
        EventKey {
            project: p(proj),
            event_type: EventType::parse("secret:created").unwrap(),
            env: EnvSlug::parse(env).unwrap(),
            path: SecretPath::parse(path).unwrap(),
        }
    }

    #[tokio::test]
    async fn shipped_policy_semantics() {
        let set = PolicySet::compile(&PolicySource::shipped(), 1)
            .await
            .unwrap();
        assert!(decide(&set, "dev-subscriber", "p1", "prod", "/apps/db"));
        assert!(!decide(
            &set,
            "dev-subscriber",
            "p1",
            "prod",
            "/internal/keys"
        ));
        assert!(!decide(&set, "dev-subscriber", "p1", "prod", "/internal"));
        assert!(decide(&set, "dev-subscriber", "p1", "prod", "/internals"));
        assert!(!decide(&set, "nobody", "p1", "prod", "/apps"));
        assert!(set.may_subscribe(
            &id("dev-subscriber"),
            &p("p1"),
            &interest("secret:created", None, "/")
        ));
        assert!(!set.may_subscribe(
            &id("dev-subscriber"),
            &p("p1"),
            &interest("secret:created", None, "/internal/x")
        ));
        assert!(!set.may_subscribe(
            &id("nobody"),
            &p("p1"),
            &interest("secret:created", None, "/")
        ));
    }

    #[tokio::test]
    async fn the_longest_paths_are_judged_like_any_other() {
        let set = PolicySet::compile(&PolicySource::shipped(), 1)
            .await
            .unwrap();
        let sub = id("dev-subscriber");
        // 32 segments, 1024 bytes: a subscription adds `/**` past both bounds.
        let deep = |top: &str| {
            let mut path = format!("/{top}{}", format!("/{}", "a".repeat(31)).repeat(30));
            let last = 1024 - path.len() - 1;
            path.push('/');
            path.push_str(&"z".repeat(last));
            path
        };
        let (open, internal) = (deep("apps"), deep("internal"));
        for path in [&open, &internal] {
            assert_eq!((path.len(), SecretPath::parse(path).is_ok()), (1024, true));
        }
        let ask =
            |path: &str| set.may_subscribe(&sub, &p("p1"), &interest("secret:created", None, path));
        assert!(ask(&open));
        assert!(!ask(&internal));
        assert!(!ask(&format!("/internal{}", "/x".repeat(31))));
        assert!(decide(&set, "dev-subscriber", "p1", "prod", &open));
        assert!(!decide(&set, "dev-subscriber", "p1", "prod", &internal));
    }

    #[tokio::test]
    async fn domains_roles_and_env_patterns() {
        let set = PolicySet::compile(
            &src("p, role:r, *, secret:*, subscribe, prod, /apps/**, allow\n\
                  p, role:base, *, *, subscribe, stag*, /**, allow\n\
                  g, alice, role:r, p1\n\
                  g, bob, role:mid, *\n\
                  g, role:mid, role:base, *\n"),
            1,
        )
        .await
        .unwrap();
        assert!(decide(&set, "alice", "p1", "prod", "/apps/x"));
        assert!(!decide(&set, "alice", "p2", "prod", "/apps/x"));
        assert!(!decide(&set, "alice", "p1", "dev", "/apps/x"));
        assert!(decide(&set, "bob", "p9", "staging", "/x"));
        assert!(!decide(&set, "bob", "p9", "prod", "/x"));
        // A registration narrower or wider than the grant: allowed when it overlaps.
        assert!(set.may_subscribe(
            &id("alice"),
            &p("p1"),
            &interest("secret:created", None, "/")
        ));
        assert!(!set.may_subscribe(
            &id("alice"),
            &p("p1"),
            &interest("secret:created", Some("dev"), "/")
        ));
        assert!(!set.may_subscribe(
            &id("alice"),
            &p("p1"),
            &interest("secret:created", None, "/other")
        ));
    }

    #[tokio::test]
    async fn claimed_roles_apply_with_the_identity_and_deny_still_wins() {
        let set = PolicySet::compile(
            &src("p, role:reader, *, secret:*, subscribe, *, /**, allow\n\
                  p, role:auditor, *, secret:*, subscribe, *, /audit/**, allow\n\
                  p, role:nosecrets, *, secret:*, subscribe, *, /internal/**, deny\n\
                  g, role:lead, role:auditor, *\n\
                  p, carol, p1, secret:*, subscribe, *, /carol/**, deny\n"),
            1,
        )
        .await
        .unwrap();
        let carol = id("carol");
        let with = |roles: &[&str]| {
            carol.with_roles(&roles.iter().map(|r| r.to_string()).collect::<Vec<_>>())
        };
        let may = |who: &Principal, path: &str| {
            set.decide(who, &key("p1", "prod", path), Action::Subscribe)
        };
        assert!(!may(&carol, "/x"), "no role, no grant");
        assert!(may(&with(&["role:reader"]), "/x"));
        // A claimed role's inherited roles apply too.
        assert!(may(&with(&["role:lead"]), "/audit/log"));
        assert!(!may(&with(&["role:lead"]), "/x"));
        // Deny rules of the identity and of any claimed role win.
        assert!(!may(&with(&["role:reader"]), "/carol/a"));
        assert!(!may(
            &with(&["role:reader", "role:nosecrets"]),
            "/internal/a"
        ));
        assert!(may(&with(&["role:reader", "role:nosecrets"]), "/public"));
        // The cache keys on the whole subject: the same identity with other
        // roles gets its own answer.
        let auth = Authorizer::new(
            &src("p, role:reader, *, secret:*, subscribe, *, /**, allow\n"),
            100,
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap();
        let k = key("p1", "prod", "/x");
        assert!(auth.may_receive(&with(&["role:reader"]), &k));
        assert!(!auth.may_receive(&carol, &k));
        // explain shows where the role came from.
        let ex = set.explain(
            &with(&["role:lead"]),
            &key("p1", "prod", "/audit/x"),
            Action::Subscribe,
        );
        assert!(ex.allowed && ex.casbin_agrees, "{ex}");
        assert!(
            ex.to_string()
                .contains("role:lead (from the token's claims)"),
            "{ex}"
        );
    }

    #[tokio::test]
    async fn an_identity_can_never_act_as_a_role() {
        // Whatever reaches the policy as an identity, even a name a token
        // could never carry, it never holds the role of the same name.
        let set = PolicySet::compile(
            &src("p, role:admin, *, *, subscribe, *, /**, allow\n\
                  p, role:reader, *, *, subscribe, *, /**, allow\n\
                  g, alice, role:reader, p1\n"),
            1,
        )
        .await
        .unwrap();
        for project in ["p1", "p2", "p9"] {
            assert!(
                !decide(&set, "role:admin", project, "prod", "/x"),
                "{project}"
            );
            assert!(
                !decide(&set, "role:reader", project, "prod", "/x"),
                "{project}"
            );
        }
        assert!(decide(&set, "alice", "p1", "prod", "/x"));
        assert!(!decide(&set, "alice", "p2", "prod", "/x"));
        assert!(!set.enforce(
            "role:reader",
            "p2",
            "secret:created",
            Action::Subscribe,
            ANY_ENV,
            &format!("{PATTERN_MARK}/**")
        ));
    }

    #[tokio::test]
    async fn lines_that_blur_identities_and_roles_are_refused() {
        for line in [
            "p, Role:admin, *, *, subscribe, *, /**, allow",
            "p, role-admin, *, *, subscribe, *, /**, allow",
            "p, roles, *, *, subscribe, *, /**, allow",
            "p, role:, *, *, subscribe, *, /**, allow",
            "g, alice, admins, p1",
            "g, alice, bob, *",
            "g, role_x, role:reader, *",
            "g, role:reader, alice, *",
        ] {
            let errs = PolicySet::compile(&src(&format!("{line}\n")), 1)
                .await
                .err()
                .unwrap_or_default();
            assert_eq!(errs.len(), 1, "{line}: {errs:?}");
            assert_eq!(errs[0].line, 1, "{line}");
        }
        // Roles may inherit roles; identities may hold roles.
        assert!(PolicySet::compile(
            &src("g, role:mid, role:base, *\ng, svc:role:x, role:mid, p1\n"),
            1
        )
        .await
        .is_ok());
    }

    #[tokio::test]
    async fn problems_name_file_and_line() {
        let errs = PolicySet::compile(
            &src("# c\np, a, p1, secret:created, subscribe, prod, /x\n\
                  p, a, p1, secret:nope, read, prod, /x/../y, maybe\n\
                  x, y\ng, a, a, *\n"),
            1,
        )
        .await
        .err()
        .unwrap();
        let lines: Vec<usize> = errs.iter().map(|p| p.line).collect();
        assert!(
            lines.contains(&2) && lines.contains(&3) && lines.contains(&4) && lines.contains(&5),
            "{errs:?}"
        );
        assert_eq!(errs.iter().filter(|p| p.line == 3).count(), 4, "{errs:?}");
        assert!(errs[0].to_string().starts_with("policy.csv:2: "));
    }

    #[tokio::test]
    async fn broken_model_is_refused() {
        let mut s = src("");
        s.model = "[request_definition]\nr = sub\n".into();
        assert!(PolicySet::compile(&s, 1).await.is_err());
    }

    #[tokio::test]
    async fn cache_is_keyed_by_generation() {
        let m = Arc::new(Metrics::new());
        let a = Authorizer::new(&src("p, alice, *, *, subscribe, *, /**, allow\n"), 1000, m)
            .await
            .unwrap();
        let alice = id("alice");
        let k = key("p1", "prod", "/a");
        assert!(a.may_receive(&alice, &k));
        assert!(a.may_receive(&alice, &k));
        a.reload(&src("p, bob, *, *, subscribe, *, /**, allow\n"))
            .await
            .unwrap();
        assert!(!a.may_receive(&alice, &k));
        assert!(a.reload(&src("p, broken\n")).await.is_err());
        assert_eq!(a.current().generation, 2);
        assert!(a.status().last_error.is_some());
    }
}
