//! The command line: `serve`, `token mint`, `config print`, `policy check`.
//!
//! This is glue: it parses flags, loads the layered config and calls the
//! library. Errors are `anyhow` here and nowhere else.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use rand::RngCore;

use crate::app;
use crate::auth::{hs_secret, parse_algorithm, Signer, Verifier};
use crate::config::Config;
use crate::event::{EventKey, EventType};
use crate::ident::{EnvSlug, Principal, ProjectId};
use crate::path::SecretPath;
use crate::policy::{Action, PolicySet, PolicySource};

/// herald: real-time secret events over Server-Sent Events.
#[derive(Parser, Debug)]
#[command(name = "herald", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Token tools.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Policy tools.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Args, Debug, Clone, Default)]
struct ConfigArgs {
    /// Config file (default: ./herald.toml when present). Must exist when given.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Development mode: ephemeral signing key, loopback only, ready-made tokens.
    #[arg(long)]
    dev: bool,
    /// Public listen address (server.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listen address (server.admin_listen).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Print a signed token.
    Mint(MintArgs),
}

#[derive(Args, Debug)]
struct MintArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// The identity, put in `auth.identity_claim` (`sub` by default); policies
    /// name it with `auth.identity_prefix` before it.
    #[arg(long)]
    sub: String,
    /// Lifetime, e.g. `1h`, `30m`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Algorithm: HS256/384/512 (uses auth.hs_secret) or RS256/ES256/EdDSA (needs --key).
    #[arg(long, default_value = "HS256")]
    alg: String,
    /// PEM private key for RS256, ES256 or EdDSA.
    #[arg(long)]
    key: Option<PathBuf>,
    /// `iss` claim (default: auth.issuer).
    #[arg(long)]
    iss: Option<String>,
    /// `aud` claim (default: auth.audience).
    #[arg(long)]
    aud: Option<String>,
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print the effective configuration, secrets redacted.
    Print(ConfigArgs),
}

/// Which policy files a policy tool reads.
#[derive(Args, Debug)]
struct PolicyFiles {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Model file (default: policy.model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Policy file (default: policy.policy).
    #[arg(long)]
    policy: Option<PathBuf>,
}

impl PolicyFiles {
    /// The model and policy paths: flags first, then the config.
    fn paths(self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let c = load(&self.cfg, &[])?;
        Ok((
            self.model.unwrap_or(c.policy.model),
            self.policy.unwrap_or(c.policy.policy),
        ))
    }
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Validate policy files; prints `file:line: message` per problem, exit 1 on any.
    Check {
        #[command(flatten)]
        files: PolicyFiles,
    },
    /// Explain one decision: allow or deny, and the lines and roles that decided it.
    /// Exit code 0 for allow, 1 for deny, 2 for bad input.
    Explain(ExplainArgs),
}

#[derive(Args, Debug)]
struct ExplainArgs {
    #[command(flatten)]
    files: PolicyFiles,
    /// The identity (a token's `sub`).
    #[arg(long)]
    sub: String,
    /// Project id.
    #[arg(long)]
    project: String,
    /// Event type, e.g. secret:updated.
    #[arg(long)]
    event: String,
    /// Environment slug.
    #[arg(long)]
    env: String,
    /// Secret folder path, e.g. /apps/db.
    #[arg(long)]
    path: String,
    /// subscribe or publish.
    #[arg(long, default_value = "subscribe")]
    action: String,
    /// A role the token's claims give the identity (`auth.roles`), e.g.
    /// role:reader; repeat for several.
    #[arg(long = "role")]
    roles: Vec<String>,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // `serve` loads its config before the runtime exists: the runtime's size is in it.
    let serve_config = match &cli.command {
        Command::Serve(args) => match serve_config(args) {
            Ok(cfg) => {
                if cfg.server.worker_threads > 0 {
                    builder.worker_threads(cfg.server.worker_threads);
                }
                Some(cfg)
            }
            Err(e) => {
                eprintln!("herald: {e:#}");
                return 1;
            }
        },
        _ => None,
    };
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start the runtime: {e}");
            return 1;
        }
    };
    let result = match (cli.command, serve_config) {
        (Command::Serve(args), Some(cfg)) => rt.block_on(serve(args, cfg)).map(|_| 0),
        (command, _) => rt.block_on(run(command)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("herald: {e:#}");
            1
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn load(cfg: &ConfigArgs, overrides: &[(&str, figment::value::Value)]) -> anyhow::Result<Config> {
    Ok(Config::load(cfg.config.as_deref(), overrides)?)
}

async fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        // `main` runs `serve` itself: its config sizes the runtime.
        Command::Serve(args) => {
            let cfg = serve_config(&args)?;
            serve(args, cfg).await.map(|_| 0)
        }
        Command::Config(ConfigCmd::Print(cfg)) => {
            print!("{}", load(&cfg, &[])?.redacted());
            Ok(0)
        }
        Command::Token(TokenCmd::Mint(args)) => mint(args),
        Command::Policy(PolicyCmd::Explain(args)) => explain(args).await,
        Command::Policy(PolicyCmd::Check { files }) => check(files).await,
    }
}

/// `herald token mint`.
fn mint(args: MintArgs) -> anyhow::Result<i32> {
    let MintArgs {
        cfg,
        sub,
        ttl,
        alg,
        key,
        iss,
        aud,
    } = args;
    let c = load(&cfg, &[])?;
    let a = parse_algorithm(&alg).with_context(|| format!("unsupported algorithm {alg:?}"))?;
    let signer = match key {
        Some(k) => {
            let pem = std::fs::read(&k).with_context(|| format!("cannot read {}", k.display()))?;
            Signer::from_pem(a, &pem)?
        }
        None => {
            if !alg.starts_with("HS") {
                bail!("{alg} needs --key PRIVATE_KEY.pem");
            }
            let secret = hs_secret(&c.auth)?.context(
                "no HS secret configured: set auth.hs_secret (HERALD_AUTH__HS_SECRET) or auth.hs_secret_file, or pass --key",
            )?;
            Signer::hmac(a, &secret)?
        }
    };
    let iss = iss.or(c.auth.issuer.clone());
    let aud = aud.or(c.auth.audience.clone());
    let claim = &c.auth.identity_claim;
    println!(
        "{}",
        signer.mint_as(claim, &sub, ttl, iss.as_deref(), aud.as_deref())?
    );
    if !c.auth.identity_prefix.is_empty() {
        eprintln!(
            "policies name this identity {}{sub} (auth.identity_prefix)",
            c.auth.identity_prefix
        );
    }
    Ok(0)
}

/// `herald policy explain`: 0 allow, 1 deny, 2 bad input.
async fn explain(args: ExplainArgs) -> anyhow::Result<i32> {
    let (model, policy) = args.files.paths()?;
    let src = PolicySource::read(&model, &policy).map_err(problems_error)?;
    let set = PolicySet::compile(&src, 1).await.map_err(problems_error)?;
    let request = || -> Result<(Principal, EventKey, Action), (&'static str, String)> {
        let identity = Principal::parse(&args.sub)
            .map_err(|e| ("--sub", format!("not an identity: it {e}")))?;
        if let Some(bad) = args
            .roles
            .iter()
            .find(|r| !crate::auth::is_claimable_role(r))
        {
            return Err(("--role", format!("{bad:?} is not a role name (role:…)")));
        }
        let identity = identity.with_roles(&args.roles);
        let event_type = EventType::parse(&args.event).ok_or_else(|| {
            let names = EventType::accepted_names();
            (
                "--event",
                format!("unknown event type; expected one of {names}"),
            )
        })?;
        let key = EventKey {
            project: ProjectId::parse(&args.project).map_err(|e| ("--project", e.to_string()))?,
            event_type,
            env: EnvSlug::parse(&args.env).map_err(|e| ("--env", e.to_string()))?,
            path: SecretPath::parse(&args.path).map_err(|e| ("--path", e.to_string()))?,
        };
        let act = match args.action.as_str() {
            "subscribe" => Action::Subscribe,
            "publish" => Action::Publish,
            _ => return Err(("--action", "must be subscribe or publish".into())),
        };
        Ok((identity, key, act))
    };
    let (identity, key, act) = match request() {
        Ok(r) => r,
        Err((flag, e)) => {
            eprintln!("herald: {flag}: {e}");
            return Ok(2);
        }
    };
    let ex = set.explain(&identity, &key, act);
    print!("{ex}");
    Ok(if ex.allowed { 0 } else { 1 })
}

/// `herald policy check`: every problem with its line, exit 1 on any.
async fn check(files: PolicyFiles) -> anyhow::Result<i32> {
    let (model, policy) = files.paths()?;
    let compiled = match PolicySource::read(&model, &policy) {
        Ok(src) => PolicySet::compile(&src, 1).await,
        Err(problems) => Err(problems),
    };
    match compiled {
        Ok(set) => {
            let (rules, links) = set.size();
            println!(
                "ok: {rules} rules, {links} role links, fingerprint {}",
                set.fingerprint
            );
            Ok(0)
        }
        Err(problems) => {
            for p in problems {
                println!("{p}");
            }
            Ok(1)
        }
    }
}

fn loopback(mut a: SocketAddr) -> SocketAddr {
    if !a.ip().is_loopback() {
        a.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    a
}

/// The configuration `serve` runs with: file, environment, then its flags.
fn serve_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut overrides: Vec<(&str, figment::value::Value)> = Vec::new();
    if let Some(l) = args.listen {
        overrides.push(("server.listen", l.to_string().into()));
    }
    if let Some(l) = args.admin_listen {
        overrides.push(("server.admin_listen", l.to_string().into()));
    }
    load(&args.cfg, &overrides)
}

/// Raises the open-file limit and says what it allows.
fn raise_open_files(cfg: &Config) {
    let Some(n) = crate::rlimit::raise() else {
        tracing::warn!("cannot read the open-file limit (RLIMIT_NOFILE)");
        return;
    };
    let cap = crate::rlimit::stream_cap(&cfg.limits, Some(n));
    tracing::info!(
        soft = n.soft,
        hard = n.hard,
        streams = cap,
        reserved = cfg.limits.reserved_fds,
        "open-file limit"
    );
    if cap < cfg.limits.max_connections {
        tracing::warn!(
            max_connections = cfg.limits.max_connections,
            streams = cap,
            "limits.max_connections does not fit in the open-file limit after limits.reserved_fds; this instance takes at most {cap} streams (raise the hard limit, e.g. `ulimit -Hn` or systemd's LimitNOFILE)"
        );
    }
}

async fn serve(args: ServeArgs, mut cfg: Config) -> anyhow::Result<()> {
    raise_open_files(&cfg);
    let mut dev_secret = None;
    if args.dev {
        cfg.server.listen = loopback(cfg.server.listen);
        cfg.server.admin_listen = loopback(cfg.server.admin_listen);
        if cfg.auth.hs_secret.is_none() && cfg.auth.hs_secret_file.is_none() {
            let mut key = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut key);
            let secret: String = key.iter().map(|b| format!("{b:02x}")).collect();
            cfg.auth.hs_secret = Some(crate::setting::Secret::new(secret));
        }
        dev_secret = hs_secret(&cfg.auth)?;
    }
    // The key before the policy: it is the setting a new operator is most likely missing.
    let verifier = Verifier::from_config(&cfg.auth)?;
    let policy = if args.dev {
        if cfg.policy.model.is_file() && cfg.policy.policy.is_file() {
            PolicySource::read(&cfg.policy.model, &cfg.policy.policy).map_err(problems_error)?
        } else {
            tracing::info!("policy files not found; using the policy shipped with herald");
            PolicySource::shipped()
        }
    } else {
        PolicySource::read(&cfg.policy.model, &cfg.policy.policy).map_err(problems_error)?
    };
    let running = app::start(cfg, verifier, policy).await?;
    tracing::info!(public = %running.public_addr, admin = %running.admin_addr, "herald ready");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "herald ready public={} admin={}{}{}",
        running.public_addr,
        running.admin_addr,
        running
            .infisical_addr
            .map(|a| format!(" infisical={a}"))
            .unwrap_or_default(),
        running
            .webhook_addr
            .map(|a| format!(" webhook={a}"))
            .unwrap_or_default()
    );
    if let Some(secret) = dev_secret {
        let _ = write!(out, "{}", dev_banner(&secret, running.public_addr)?);
    }
    let _ = out.flush();
    drop(out);
    app::wait_for_signal().await;
    running.drain().await;
    Ok(())
}

fn problems_error(problems: Vec<crate::policy::Problem>) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot load the policy:\n{}",
        crate::policy::Problems(problems)
    )
}

fn dev_banner(secret: &[u8], addr: SocketAddr) -> anyhow::Result<String> {
    let signer = Signer::hmac(jsonwebtoken::Algorithm::HS256, secret)?;
    let day = Duration::from_secs(24 * 3600);
    let sub = signer.mint("dev-subscriber", day, None, None)?;
    let publ = signer.mint("dev-publisher", day, None, None)?;
    let base = format!("http://{addr}");
    Ok(format!(
        r#"
== herald dev mode: loopback only, ephemeral signing key, tokens valid 24h ==

SUB_TOKEN={sub}
PUB_TOKEN={publ}

# Terminal 1: subscribe (dev-subscriber may read every secret event except /internal/**)
curl -N -H "Authorization: Bearer $SUB_TOKEN" -H 'Content-Type: application/json' \
  -d '{{"projectId":"demo","register":[{{"event":"secret:created","conditions":{{"environmentSlug":"dev","secretPath":"/apps"}}}}]}}' \
  {base}/api/v1/events/subscribe/project-events

# Terminal 2: publish (dev-publisher)
curl -H "Authorization: Bearer $PUB_TOKEN" -H 'Content-Type: application/json' \
  -d '{{"specversion":"1.0","source":"/dev","type":"secret:created","projectid":"demo","environment":"dev","secretpath":"/apps/db","data":{{"secretKeys":["DB_PASSWORD"]}}}}' \
  {base}/api/v1/events/publish

"#
    ))
}
