//! Wiring: builds every component from its config section, starts the
//! listeners and background tasks, and hands back what drains them.
//!
//! Start-up order: the caller builds the verifier (fails without a key) and
//! reads the policy; then the policy compiles (fails on any problem), router,
//! bus, use cases, listeners. The drain is `shutdown::drain`; policy reloads
//! are `policy::Reloader`'s; cluster presence is `cluster::run`'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::auth::Verifier;
use crate::bus::{Bus, EmbeddedBus, NatsBus};
use crate::cluster::{Cluster, LocalView};
use crate::config::Config;
use crate::http::admin::Admin;
use crate::http::api::{Api, BodyLimits};
use crate::http::cors::Cors;
use crate::http::webhook::Webhook;
use crate::http::{self, ServeOptions};
use crate::ingest::webhook::Receiver;
use crate::ingest::{Ingest, SourceId};
use crate::limits::{ConnectionLimiter, RateLimiter};
use crate::metrics::Metrics;
use crate::policy::{Authorizer, PolicySource, Problems, Reloader};
use crate::protocol::Dialect;
use crate::publish::{PublishError, Publisher};
use crate::remember::Remember;
use crate::request::SubscribeLimits;
use crate::router::Router;
use crate::shutdown::{Phase, Shutdown};
use crate::subscribe::{StreamDefaults, SubscribeError, Subscriptions};

/// A started server.
pub struct Running {
    /// Bound public address.
    pub public_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// Bound address of the Infisical-dialect listener, when configured.
    pub infisical_addr: Option<SocketAddr>,
    /// Bound address of the webhook receiver, when configured.
    pub webhook_addr: Option<SocketAddr>,
    config: Config,
    core: Core,
    tasks: Vec<JoinHandle<()>>,
}

/// The components every other one is built on.
#[derive(Clone)]
struct Core {
    metrics: Arc<Metrics>,
    authorizer: Arc<Authorizer>,
    router: Arc<Router>,
    bus: Arc<Bus>,
    cluster: Option<Arc<Cluster>>,
    local: Arc<LocalView>,
    limiter: Arc<ConnectionLimiter>,
    remember: Option<Arc<Remember>>,
    ingest: Option<Arc<Ingest>>,
    shutdown: Shutdown,
}

/// A listening socket with SO_REUSEADDR, so a restarted instance can take its
/// port back while connections of the previous process linger in TIME_WAIT.
fn listen(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(4096)
    };
    bind().with_context(|| {
        let env = key.replace('.', "__").to_uppercase();
        format!("cannot listen on {addr} ({key}, HERALD_{env})")
    })
}

/// Builds every component and starts serving. Fails with a message naming
/// what to fix.
pub async fn start(
    config: Config,
    verifier: Verifier,
    policy: PolicySource,
) -> anyhow::Result<Running> {
    let core = core(&config, &policy, verifier.metrics()).await?;
    let verifier = Arc::new(verifier);
    let public = listen(config.server.listen, "server.listen")?;
    let admin = listen(config.server.admin_listen, "server.admin_listen")?;
    let (public_addr, admin_addr) = (public.local_addr()?, admin.local_addr()?);
    let opts = ServeOptions {
        header_read_timeout: config.server.header_read_timeout,
        body_read_timeout: config.server.body_read_timeout,
        max_body_bytes: config.limits.max_body_bytes,
    };
    // Connections left after the drain get this much longer to finish.
    let close_deadline = Duration::from_secs(2);
    let infisical = match config.server.infisical_listen {
        Some(a) => Some(listen(a, "server.infisical_listen")?),
        None => None,
    };
    let infisical_addr = match &infisical {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let api = public_api(&config, &core, verifier.clone());
    // One set of use cases (limits, rates) behind both public listeners.
    let infisical_api = Arc::new(Api {
        dialect: Dialect::Infisical,
        ..api.clone()
    });
    let api = Arc::new(api);
    let mut tasks = vec![
        tokio::spawn(http::serve(
            public,
            api,
            opts,
            core.shutdown.clone(),
            close_deadline,
        )),
        tokio::spawn(http::serve(
            admin,
            Arc::new(admin_api(&core, verifier.clone())),
            opts,
            core.shutdown.clone(),
            close_deadline,
        )),
    ];
    if let Some(l) = infisical {
        tasks.push(tokio::spawn(http::serve(
            l,
            infisical_api,
            opts,
            core.shutdown.clone(),
            close_deadline,
        )));
    }
    let mut webhook_addr = None;
    if let (Some(addr), Some(ingest)) = (config.ingest.webhook.listen, &core.ingest) {
        let l = listen(addr, "ingest.webhook.listen")?;
        webhook_addr = Some(l.local_addr()?);
        let receiver = Receiver::new(
            config.ingest.webhook.clone(),
            ingest.clone(),
            config.limits.max_event_bytes,
        );
        let receiver = Webhook::new(
            receiver,
            config.server.body_read_timeout,
            core.metrics.clone(),
        );
        ingest.connected(SourceId::Webhook, true, None);
        tasks.push(tokio::spawn(http::serve(
            l,
            Arc::new(receiver),
            opts,
            core.shutdown.clone(),
            close_deadline,
        )));
    }
    tasks.extend(background(&config, &core, &policy));
    tasks.extend(verifier.run(|| {
        let s = core.shutdown.clone();
        async move { s.reached(Phase::Stopped).await }
    }));
    Ok(Running {
        public_addr,
        admin_addr,
        infisical_addr,
        webhook_addr,
        config,
        core,
        tasks,
    })
}

/// Metrics, policy, router, bus, cluster view, limits.
async fn core(
    config: &Config,
    policy: &PolicySource,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Core> {
    Metrics::preset(&metrics.subscriptions, SubscribeError::LABELS);
    Metrics::preset(&metrics.publishes, PublishError::LABELS);
    Metrics::preset(&metrics.auth_failures, crate::auth::AuthError::REASONS);
    let authorizer = Authorizer::new(policy, config.policy.cache_size, metrics.clone())
        .await
        .map_err(|p| anyhow::anyhow!("the policy has problems:\n{}", Problems(p)))?;
    let authorizer = Arc::new(authorizer);
    let router = Arc::new(Router::new(authorizer.clone(), metrics.clone()));
    let instance_id = uuid::Uuid::new_v4().simple().to_string();
    let (bus, cluster) = if config.nats.urls.is_empty() {
        let ring = config.stream.replay_buffer;
        let bus = EmbeddedBus::new(router.clone(), metrics.clone(), ring);
        (Bus::Embedded(bus), None)
    } else {
        let bus = NatsBus::connect(
            &config.nats,
            &config.replay,
            &instance_id,
            router.clone(),
            metrics.clone(),
            config.limits.max_event_bytes,
            config.stream.retry,
        )
        .await?;
        let interval = config.nats.presence_interval;
        let bounds = crate::cluster::PresenceBounds {
            // With an Infisical listener, a peer may hold an identity's
            // streams on a project up to that listener's per-project rule.
            per_identity_project: if config.server.infisical_listen.is_some() {
                config
                    .limits
                    .connections_per_identity_project
                    .max(config.limits.infisical_streams_per_project)
            } else {
                config.limits.connections_per_identity_project
            },
            per_identity: config.limits.connections_per_identity,
            per_project: config.limits.infisical_streams_per_project,
        };
        let cluster = Arc::new(Cluster::new(
            instance_id.clone(),
            interval,
            bounds,
            metrics.clone(),
        ));
        (Bus::Nats(bus), Some(cluster))
    };
    let remember = remember(config, &bus, &metrics);
    let bus = Arc::new(bus);
    let ingest = config.ingest.enabled().then(|| {
        Arc::new(Ingest::new(
            &config.ingest,
            bus.clone(),
            router.clone(),
            metrics.clone(),
        ))
    });
    let cap = crate::rlimit::stream_cap(&config.limits, crate::rlimit::current());
    let limiter = Arc::new(ConnectionLimiter::new(&config.limits, cap));
    let local = Arc::new(LocalView {
        instance_id,
        router: router.clone(),
        authorizer: authorizer.clone(),
        limiter: limiter.clone(),
    });
    Ok(Core {
        metrics,
        authorizer,
        router,
        bus,
        cluster,
        local,
        limiter,
        remember,
        ingest,
        shutdown: Shutdown::new(),
    })
}

/// Remembered positions: in memory with the embedded bus, in a JetStream
/// bucket with replay; none on NATS without replay (nothing to resume from).
fn remember(config: &Config, bus: &Bus, metrics: &Arc<Metrics>) -> Option<Arc<Remember>> {
    let cfg = config.remember.clone();
    if cfg.dialects.is_empty() {
        return None;
    }
    let r = match bus {
        Bus::Embedded(_) => Remember::in_memory(cfg, metrics.clone()),
        Bus::Nats(_) if !config.replay.enabled => {
            tracing::info!(
                "remember: off (NATS without replay keeps nothing to resume from; set replay.enabled)"
            );
            return None;
        }
        Bus::Nats(nats) => Remember::in_bucket(
            cfg,
            nats.client().clone(),
            config.replay.replicas,
            config.nats.request_timeout,
            metrics.clone(),
        ),
    };
    Some(Arc::new(r))
}

/// The public listener: the subscribe and publish use cases, CORS, bodies.
fn public_api(config: &Config, core: &Core, verifier: Arc<Verifier>) -> Api {
    let limits = &config.limits;
    let subscriptions = Subscriptions {
        verifier: verifier.clone(),
        authorizer: core.authorizer.clone(),
        router: core.router.clone(),
        bus: core.bus.clone(),
        limiter: core.limiter.clone(),
        rate: RateLimiter::new(limits.subscribe_rate, limits.subscribe_burst),
        cluster: core.cluster.clone(),
        limits: SubscribeLimits {
            max_registrations: limits.max_registrations,
            max_registration_bytes: limits.max_registration_bytes,
        },
        streams: StreamDefaults {
            queue_frames: config.stream.queue_frames,
            heartbeat: config.stream.heartbeat,
            retry: config.stream.retry,
            close_timeout: config.stream.close_timeout,
            max_lifetime: config.stream.lifetime(),
        },
        remember: core.remember.clone(),
        metrics: core.metrics.clone(),
        shutdown: core.shutdown.clone(),
    };
    let publisher = Publisher {
        verifier,
        authorizer: core.authorizer.clone(),
        bus: core.bus.clone(),
        max_event_bytes: limits.max_event_bytes,
        max_batch: limits.max_publish_batch,
        metrics: core.metrics.clone(),
    };
    Api {
        subscriptions: Arc::new(subscriptions),
        publisher: Arc::new(publisher),
        cors: Cors::new(&config.cors.allowed_origins),
        body: BodyLimits {
            max_bytes: limits.max_body_bytes,
            timeout: config.server.body_read_timeout,
        },
        dialect: Dialect::Native,
    }
}

/// The admin listener.
fn admin_api(core: &Core, verifier: Arc<Verifier>) -> Admin {
    Admin {
        verifier,
        metrics: core.metrics.clone(),
        router: core.router.clone(),
        authorizer: core.authorizer.clone(),
        bus: core.bus.clone(),
        cluster: core.cluster.clone(),
        local: core.local.clone(),
        shutdown: core.shutdown.clone(),
        ingest: core.ingest.clone(),
    }
}

/// The policy reloader and, on NATS, cluster presence; both end at `Stopped`.
fn background(config: &Config, core: &Core, policy: &PolicySource) -> Vec<JoinHandle<()>> {
    let stopped = || {
        let s = core.shutdown.clone();
        async move { s.reached(Phase::Stopped).await }
    };
    let revoker = core.router.clone();
    let reloader = Reloader::new(
        core.authorizer.clone(),
        policy.files.clone(),
        Box::new(move |set| revoker.revoke_disallowed(set)),
    );
    let (watch, interval) = (config.policy.watch, config.policy.watch_interval);
    let mut tasks = vec![tokio::spawn(reloader.run(watch, interval, stopped()))];
    if let Some(r) = &core.remember {
        tasks.push(tokio::spawn(r.clone().run(stopped())));
    }
    if let (Some(ingest), true) = (&core.ingest, config.ingest.redis.url.is_some()) {
        tasks.push(tokio::spawn(crate::ingest::redis::run(
            config.ingest.redis.clone(),
            ingest.clone(),
            config.limits.max_event_bytes,
            stopped(),
        )));
    }
    if let (Some(cluster), Bus::Nats(nats)) = (core.cluster.clone(), &*core.bus) {
        let (summary, local) = (core.metrics.clone(), core.local.clone());
        tasks.push(tokio::spawn(crate::cluster::run(
            cluster,
            nats.client().clone(),
            nats.prefix().to_owned(),
            move || local.presence(),
            move |instances: usize, fingerprints: usize| {
                summary.cluster_instances.set(instances as i64);
                summary.cluster_policy_fingerprints.set(fingerprints as i64);
            },
            stopped(),
        )));
    }
    tasks
}

impl Running {
    /// Drains gracefully (`shutdown::drain`), then waits for every task:
    /// the listeners (which wait for their connections), the policy
    /// reloader, cluster presence, and the bus's own.
    pub async fn drain(self) {
        let core = &self.core;
        let retry = self.config.stream.retry;
        crate::shutdown::drain(&core.shutdown, &core.router, &self.config.shutdown, retry).await;
        for t in self.tasks {
            let _ = t.await;
        }
        // Every stream has ended: their last positions are saved while the
        // bus is still there.
        if let Some(r) = &core.remember {
            r.save_moved().await;
        }
        core.bus.close(Duration::from_secs(2)).await;
        tracing::info!("stopped");
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
