//! Wiring: builds every component from the config, starts the listeners, and
//! runs the graceful drain.
//!
//! Start-up order: the caller builds the verifier (fails without a key) and
//! reads the policy; then the policy compiles (fails on any problem), router,
//! bus, listeners. Drain order on SIGTERM/SIGINT: readiness
//! fails and new subscribes are told to reconnect; after `shutdown.grace`, open
//! streams get `reconnect` spread over `shutdown.drain_window`; listeners stop
//! when the streams are gone or at `shutdown.deadline`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rand::seq::SliceRandom;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::auth::Verifier;
use crate::bus::{Bus, EmbeddedBus, NatsBus};
use crate::cluster::{Cluster, Presence};
use crate::config::Config;
use crate::http::api::{Api, BodyLimits};
use crate::http::cors::Cors;
use crate::http::{self, admin::Admin, ServeOptions};
use crate::limits::{ConnectionLimiter, RateLimiter};
use crate::metrics::Metrics;
use crate::policy::watch::FileWatch;
use crate::policy::{Authorizer, PolicySource};
use crate::protocol::{jittered_retry_ms, Close, ReconnectReason};
use crate::publish::Publisher;
use crate::request::SubscribeLimits;
use crate::router::Router;
use crate::shutdown::{Phase, Shutdown};
use crate::subscribe::{StreamDefaults, Subscriptions};

/// Everything a request handler needs.
pub struct App {
    /// The effective configuration.
    pub config: Config,
    /// Opening streams.
    pub subscriptions: Arc<Subscriptions>,
    /// Taking events.
    pub publisher: Arc<Publisher>,
    /// The policy in force.
    pub authorizer: Arc<Authorizer>,
    /// The event bus.
    pub bus: Arc<Bus>,
    /// Open streams.
    pub router: Arc<Router>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Stream slots.
    pub conn_limiter: Arc<ConnectionLimiter>,
    /// Lifecycle.
    pub shutdown: Shutdown,
    /// The policy files (model, policy), when the policy came from files.
    pub policy_files: Option<(PathBuf, PathBuf)>,
    /// This process's instance id.
    pub instance_id: String,
    /// Other instances, when on NATS.
    pub cluster: Option<Arc<Cluster>>,
}

impl App {
    /// Builds every component from the config, the token verifier built from
    /// it, and the policy read. Fails with a message naming what to fix.
    pub async fn build(
        config: Config,
        verifier: Verifier,
        policy: PolicySource,
    ) -> anyhow::Result<Arc<App>> {
        let metrics = Arc::new(Metrics::new());
        let authorizer = Authorizer::new(&policy, config.policy.cache_size, metrics.clone())
            .await
            .map_err(|problems| {
                let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
                anyhow::anyhow!("the policy has problems:\n  {}", list.join("\n  "))
            })?;
        let authorizer = Arc::new(authorizer);
        let router = Arc::new(Router::new(authorizer.clone(), metrics.clone()));
        let instance_id = uuid::Uuid::new_v4().simple().to_string();
        let (bus, cluster) = if config.nats.urls.is_empty() {
            let bus =
                EmbeddedBus::new(router.clone(), metrics.clone(), config.stream.replay_buffer);
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
            let cluster = Arc::new(Cluster::new(
                instance_id.clone(),
                config.nats.presence_interval,
            ));
            (Bus::Nats(bus), Some(cluster))
        };
        let policy_files = policy.files.clone();
        let bus = Arc::new(bus);
        let verifier = Arc::new(verifier);
        let shutdown = Shutdown::new();
        let conn_limiter = Arc::new(ConnectionLimiter::new(
            &config.limits,
            crate::rlimit::stream_cap(&config.limits, crate::rlimit::current()),
        ));
        let subscriptions = Arc::new(Subscriptions {
            verifier: verifier.clone(),
            authorizer: authorizer.clone(),
            router: router.clone(),
            bus: bus.clone(),
            limiter: conn_limiter.clone(),
            rate: RateLimiter::new(config.limits.subscribe_rate, config.limits.subscribe_burst),
            cluster: cluster.clone(),
            limits: SubscribeLimits {
                max_registrations: config.limits.max_registrations,
                max_registration_bytes: config.limits.max_registration_bytes,
            },
            streams: StreamDefaults {
                queue_frames: config.stream.queue_frames,
                heartbeat: config.stream.heartbeat,
                retry: config.stream.retry,
                close_timeout: config.stream.close_timeout,
            },
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        });
        let publisher = Arc::new(Publisher {
            verifier,
            authorizer: authorizer.clone(),
            bus: bus.clone(),
            max_event_bytes: config.limits.max_event_bytes,
            max_batch: config.limits.max_publish_batch,
            metrics: metrics.clone(),
        });
        Ok(Arc::new(App {
            instance_id,
            cluster,
            policy_files,
            conn_limiter,
            subscriptions,
            publisher,
            authorizer,
            bus,
            router,
            metrics,
            shutdown,
            config,
        }))
    }

    /// Re-reads the policy files and swaps the policy in if it is fully valid;
    /// then closes every open stream with a registration the new policy no
    /// longer allows. A broken policy leaves the one in force untouched.
    pub async fn reload_policy(&self, why: &str) {
        let Some((model, policy)) = &self.policy_files else {
            tracing::warn!(
                why,
                "the policy is the built-in copy; there are no files to reload"
            );
            return;
        };
        let loaded = match PolicySource::read(model, policy) {
            Ok(src) => self.authorizer.reload(&src).await,
            Err(problems) => {
                self.authorizer.record_failure(problems.clone());
                Err(problems)
            }
        };
        match loaded {
            Ok(set) => {
                let revoked = self.revoke_disallowed(&set);
                tracing::info!(why, generation = set.generation, fingerprint = %set.fingerprint, revoked, "policy reloaded");
            }
            Err(problems) => {
                for p in &problems {
                    tracing::error!(why, problem = %p, "policy reload failed; the previous policy stays in force");
                }
            }
        }
    }

    /// Closes the streams `set` no longer allows; returns how many.
    pub fn revoke_disallowed(&self, set: &crate::policy::PolicySet) -> usize {
        let mut revoked = 0;
        for conn in self.router.connections() {
            let denied = conn
                .interests
                .iter()
                .enumerate()
                .find(|(_, it)| !set.may_subscribe(&conn.identity, &conn.project, it));
            if let Some((i, it)) = denied {
                if conn.close(Close::PermissionRevoked(format!("register[{i}]: {it}"))) {
                    revoked += 1;
                }
            }
        }
        revoked
    }

    /// What this instance announces to the others.
    pub fn presence(&self) -> Presence {
        let policy = self.authorizer.current();
        Presence {
            id: self.instance_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            connections: self.router.len(),
            policy_generation: policy.generation,
            policy_fingerprint: policy.fingerprint.clone(),
            streams: self
                .conn_limiter
                .snapshot()
                .into_iter()
                .map(|(s, p, n)| (s.to_string(), p.to_string(), n))
                .collect(),
        }
    }
}

/// A started server.
pub struct Running {
    /// The app.
    pub app: Arc<App>,
    /// Bound public address.
    pub public_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

/// A listening socket with SO_REUSEADDR, so a restarted instance can take its
/// port back while connections of the previous process linger in TIME_WAIT.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Binds both listeners and starts serving.
pub async fn start(app: Arc<App>) -> anyhow::Result<Running> {
    let cfg = &app.config;
    let public = listen(cfg.server.listen).with_context(|| {
        format!(
            "cannot listen on {} (server.listen, HERALD_SERVER__LISTEN)",
            cfg.server.listen
        )
    })?;
    let admin = listen(cfg.server.admin_listen).with_context(|| {
        format!(
            "cannot listen on {} (server.admin_listen, HERALD_SERVER__ADMIN_LISTEN)",
            cfg.server.admin_listen
        )
    })?;
    let public_addr = public.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let opts = ServeOptions {
        header_read_timeout: cfg.server.header_read_timeout,
        body_read_timeout: cfg.server.body_read_timeout,
        max_body_bytes: cfg.limits.max_body_bytes,
    };
    // Connections left after the drain get this much longer to finish.
    let close_deadline = Duration::from_secs(2);
    let tasks = vec![
        tokio::spawn(http::serve(
            public,
            Arc::new(Api {
                subscriptions: app.subscriptions.clone(),
                publisher: app.publisher.clone(),
                cors: Cors::new(&cfg.cors.allowed_origins),
                body: BodyLimits {
                    max_bytes: cfg.limits.max_body_bytes,
                    timeout: cfg.server.body_read_timeout,
                },
            }),
            opts,
            app.shutdown.clone(),
            close_deadline,
        )),
        tokio::spawn(http::serve(
            admin,
            Arc::new(Admin(app.clone())),
            opts,
            app.shutdown.clone(),
            close_deadline,
        )),
        tokio::spawn(policy_reloader(app.clone())),
        tokio::spawn(run_cluster(app.clone())),
    ];
    Ok(Running {
        app,
        public_addr,
        admin_addr,
        tasks,
    })
}

impl Running {
    /// Drains gracefully (see the module docs) and waits for the listeners.
    pub async fn drain(self) {
        let app = self.app.clone();
        let cfg = app.config.shutdown.clone();
        let cfg_retry = app.config.stream.retry;
        let all = async {
            app.shutdown.advance(Phase::Draining);
            tracing::info!(streams = app.router.len(), "draining");
            if !app.router.is_empty() {
                tokio::time::sleep(cfg.grace).await;
            }
            let mut conns = app.router.connections();
            conns.shuffle(&mut rand::thread_rng());
            let n = conns.len().max(1) as u32;
            let start = tokio::time::Instant::now();
            for (i, c) in conns.iter().enumerate() {
                tokio::time::sleep_until(start + cfg.drain_window * i as u32 / n).await;
                c.close(Close::Reconnect {
                    reason: ReconnectReason::Draining,
                    retry_ms: jittered_retry_ms(cfg_retry),
                });
            }
            while !app.router.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(cfg.deadline, all).await.is_err() {
            tracing::warn!(streams = app.router.len(), "drain deadline reached");
        }
        app.shutdown.advance(Phase::Stopped);
        for t in self.tasks {
            let _ = t.await;
        }
        tracing::info!("stopped");
    }
}

/// Takes part in the cluster when on NATS.
async fn run_cluster(app: Arc<App>) {
    let (Some(cluster), Bus::Nats(bus)) = (app.cluster.clone(), &*app.bus) else {
        return;
    };
    let me = {
        let app = app.clone();
        move || app.presence()
    };
    let metrics = app.metrics.clone();
    let on_summary = move |instances: usize, fingerprints: usize| {
        metrics.cluster_instances.set(instances as i64);
        metrics.cluster_policy_fingerprints.set(fingerprints as i64);
    };
    crate::cluster::run(
        cluster,
        bus.client().clone(),
        bus.prefix().to_owned(),
        me,
        on_summary,
        app.shutdown.reached(Phase::Stopped),
    )
    .await;
}

/// Reloads the policy on SIGHUP and, with `policy.watch`, when its files change.
async fn policy_reloader(app: Arc<App>) {
    let mut watch = app
        .policy_files
        .as_ref()
        .filter(|_| app.config.policy.watch)
        .map(|(m, p)| FileWatch::new(vec![m.clone(), p.clone()]));
    let mut tick = tokio::time::interval(app.config.policy.watch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .inspect_err(|e| tracing::error!(error = %e, "cannot listen for SIGHUP"))
        .ok();
    let stopped = app.shutdown.reached(Phase::Stopped);
    tokio::pin!(stopped);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick(), if watch.is_some() => {
                if watch.as_mut().is_some_and(FileWatch::poll) {
                    app.reload_policy("file change").await;
                }
            }
            _ = hangup => {
                if let Some(w) = watch.as_mut() {
                    w.mark_loaded();
                }
                app.reload_policy("SIGHUP").await;
            }
        }
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
