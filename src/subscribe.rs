//! The subscribe use case: who may open which stream, and opening it.
//!
//! Order of checks: draining, token, subscribe rate, (the caller parses the
//! request), permission for every registration, stream limits (cluster-wide
//! on NATS), then the stream is built, registered and attached to the bus
//! (which replays what a resume missed). Every refusal is a typed
//! [`SubscribeError`]; `http` turns it into a response and counts it, once.
//! Nothing here knows HTTP.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::{AuthError, Caller, Recheck, Verifier};
use crate::bus::{Bus, BusError};
use crate::cluster::{Cluster, TouchOnDrop};
use crate::ident::{Principal, ProjectId};
use crate::interest::Interest;
use crate::limits::{ConnectionLimiter, Limit, ProjectCap, RateLimiter};
use crate::metrics::Metrics;
use crate::policy::Authorizer;
use crate::protocol::{Close, Control, Dialect, GapReason};
use crate::remember::{Key, Recall, Remember};
use crate::request::{BodyError, RequestError, SubscribeLimits, SubscribeRequest};
use crate::router::Router;
use crate::shutdown::Shutdown;
use crate::stream::{
    new_stream, CloseWatch, Resumed, SseStream, StreamHandle, StreamSettings, Subscriber,
};

/// Why a stream was not opened.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The instance is shutting down.
    #[error("this instance is draining")]
    Draining,
    /// No valid token.
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// Too many subscribes from this identity.
    #[error("too many subscribe requests; slow down")]
    RateLimited,
    /// The request is not one herald takes.
    #[error(transparent)]
    Invalid(#[from] RequestError),
    /// Its body could not be taken.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The policy does not allow registration `index`.
    #[error("{identity} may not subscribe to {interest} in project {project}")]
    Forbidden {
        /// Who asked.
        identity: Principal,
        /// The project.
        project: ProjectId,
        /// Which registration.
        index: usize,
        /// The registration.
        interest: Interest,
    },
    /// A stream limit is reached.
    #[error("{}", limit_message(*.limit, .identity, .project, *.value))]
    Limited {
        /// Which limit.
        limit: Limit,
        /// Its value.
        value: usize,
        /// Who asked.
        identity: Principal,
        /// The project.
        project: ProjectId,
    },
    /// The bus cannot take the stream now.
    #[error("cannot take interest for the stream")]
    BusUnavailable(#[source] BusError),
}

fn limit_message(limit: Limit, identity: &Principal, project: &ProjectId, value: usize) -> String {
    match limit {
        Limit::ConnectionsPerIdentity => format!(
            "{identity} already has {value} open streams on project {project} (across all instances)"
        ),
        Limit::ConnectionsPerIdentityTotal => format!(
            "{identity} already has {value} open streams on all projects together (across all instances)"
        ),
        Limit::InstanceConnections => "this instance has reached its stream limit".to_owned(),
        Limit::SubscribeRate => "too many subscribe requests; slow down".to_owned(),
        Limit::StreamsPerProject => format!(
            "project {project} already has {value} open streams (all identities, across all instances)"
        ),
    }
}

impl SubscribeError {
    /// The result label of `herald_subscriptions_total{result}`.
    pub fn label(&self) -> &'static str {
        match self {
            SubscribeError::Draining => "draining",
            SubscribeError::Unauthorized(AuthError::ProviderUnavailable) => "provider_unavailable",
            SubscribeError::Unauthorized(_) => "unauthorized",
            SubscribeError::RateLimited | SubscribeError::Limited { .. } => "limited",
            SubscribeError::Invalid(_) | SubscribeError::Body(_) => "bad_request",
            SubscribeError::Forbidden { .. } => "forbidden",
            SubscribeError::BusUnavailable(_) => "bus_unavailable",
        }
    }

    /// Every label [`label`](Self::label) can return, and `accepted`.
    pub const LABELS: &'static [&'static str] = &[
        "accepted",
        "draining",
        "unauthorized",
        "limited",
        "bad_request",
        "forbidden",
        "bus_unavailable",
        "provider_unavailable",
    ];
}

/// How new streams behave (`[stream]`).
#[derive(Clone, Copy, Debug)]
pub struct StreamDefaults {
    /// Queue capacity, in events.
    pub queue_frames: usize,
    /// Heartbeat interval.
    pub heartbeat: std::time::Duration,
    /// The first `retry:` hint.
    pub retry: std::time::Duration,
    /// How long a closing stream may take before its connection is dropped.
    pub close_timeout: std::time::Duration,
    /// The longest a stream stays open, if bounded.
    pub max_lifetime: Option<std::time::Duration>,
}

/// Everything opening a stream needs.
pub struct Subscriptions {
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// The policy in force.
    pub authorizer: Arc<Authorizer>,
    /// Open streams.
    pub router: Arc<Router>,
    /// Where events come from.
    pub bus: Arc<Bus>,
    /// Stream slots.
    pub limiter: Arc<ConnectionLimiter>,
    /// Subscribe rate per identity.
    pub rate: RateLimiter,
    /// Other instances, on NATS (cluster-wide limits).
    pub cluster: Option<Arc<Cluster>>,
    /// Request bounds.
    pub limits: SubscribeLimits,
    /// New streams' settings.
    pub streams: StreamDefaults,
    /// Where streams without `Last-Event-ID` left off, when remembered.
    pub remember: Option<Arc<Remember>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The lifecycle.
    pub shutdown: Shutdown,
}

impl Subscriptions {
    /// Refuses new streams while draining (they are told to reconnect).
    pub fn check_open(&self) -> Result<(), SubscribeError> {
        if self.shutdown.is_draining() {
            return Err(SubscribeError::Draining);
        }
        Ok(())
    }

    /// The caller a token names, within its subscribe rate.
    pub async fn caller(&self, token: Option<&str>) -> Result<Caller, SubscribeError> {
        let caller = verify(&self.verifier, &self.metrics, token).await?;
        if !self.rate.try_take(&caller.identity) {
            self.metrics
                .limit_rejections
                .with_label_values(&[Limit::SubscribeRate.label()])
                .inc();
            return Err(SubscribeError::RateLimited);
        }
        Ok(caller)
    }

    /// Opens a stream of `req` for `caller` in `dialect`, resuming after
    /// `resume` when given. `abort` drops the client's connection when the
    /// stream cannot end by itself (`watch` is told when it closes).
    pub async fn open(
        &self,
        caller: &Caller,
        req: SubscribeRequest,
        resume: Option<u64>,
        dialect: Dialect,
        watch: Option<Arc<dyn CloseWatch>>,
    ) -> Result<SseStream, SubscribeError> {
        let SubscribeRequest { project, interests } = req;
        let identity = &caller.identity;
        self.check_permission(&caller.subject, &project, &interests)?;
        let slot = self.take_slot(identity, &project, dialect)?;
        // A client that sends no Last-Event-ID resumes where its last
        // stream of the same registrations left off, when remembered.
        let remember = self.remember.as_ref().filter(|r| r.remembers(dialect));
        let key = remember.map(|_| Key::new(identity, &project, &interests));
        let settings = StreamSettings {
            dialect,
            queue_frames: self.streams.queue_frames,
            heartbeat: self.streams.heartbeat,
            retry: self.streams.retry,
            expires_in: caller.remaining(),
            close_timeout: self.streams.close_timeout,
            max_lifetime: self.streams.max_lifetime,
            starts_at_head: remember.is_some(),
        };
        // A registration an open stream already holds is shared, not copied.
        let interests = interests
            .into_iter()
            .map(|it| self.router.shared_interest(&project, it))
            .collect();
        let who = Subscriber {
            id: self.router.next_conn_id(),
            // Policies are asked about the subject: the identity and its claimed roles.
            identity: caller.subject.clone(),
            project,
            interests,
        };
        let (handle, mut stream) = new_stream(
            who,
            &settings,
            watch,
            self.authorizer.clone(),
            self.metrics.clone(),
        );
        stream.hold(Box::new(slot));
        if let Some(recheck) = &caller.recheck {
            stream.hold(Box::new(recheck_while_open(recheck.clone(), &handle)));
        }
        if let Some(c) = &self.cluster {
            stream.hold(Box::new(TouchOnDrop(c.clone())));
            c.touch();
        }
        // Without Last-Event-ID, a remembered stream is held from its start
        // and resumed once its position is read: its response head does not
        // wait for the read.
        let held = (remember.is_some() && resume.is_none()).then(|| handle.pause());
        self.bus
            .attach(&mut stream, resume)
            .await
            .map_err(SubscribeError::BusUnavailable)?;
        if let (Some(r), Some(k)) = (remember, key) {
            match held {
                Some(generation) => {
                    let tracking = Arc::new(parking_lot::Mutex::new(None));
                    stream.hold(Box::new(tracking.clone()));
                    let (r, bus, handle) = (r.clone(), self.bus.clone(), handle.clone());
                    tokio::spawn(async move {
                        let recall = r.recall(&k).await;
                        let (after, open) = match recall {
                            Recall::Resume(seq) => (Some(seq), None),
                            Recall::ResumeAfterGap(seq) => {
                                (Some(seq), Some(GapReason::WindowPassed))
                            }
                            Recall::WindowPassed => (None, Some(GapReason::WindowPassed)),
                            Recall::Unavailable => (None, Some(GapReason::BusUnavailable)),
                            Recall::New => (None, None),
                        };
                        let open = open.map(Control::Gap);
                        // Until its resume is written, what it saves is where it resumes from.
                        let guard = r.track_from(k, &handle, after);
                        match after {
                            Some(seq) => bus.resume_held(&handle, generation, seq, open),
                            None => handle.resume_with(Resumed::nothing(
                                generation,
                                handle.position(),
                                open,
                            )),
                        }
                        *tracking.lock() = Some(guard);
                    });
                }
                None => stream.hold(Box::new(r.track(k, &handle))),
            }
        }
        Ok(stream)
    }

    /// Every registration must be allowed; the first that is not is named.
    fn check_permission(
        &self,
        identity: &Principal,
        project: &ProjectId,
        interests: &[Interest],
    ) -> Result<(), SubscribeError> {
        let policy = self.authorizer.current();
        let Some((index, interest)) = interests
            .iter()
            .enumerate()
            .find(|(_, it)| !policy.may_subscribe(identity, project, it))
        else {
            return Ok(());
        };
        self.metrics
            .permission_denied
            .with_label_values(&["subscribe"])
            .inc();
        Err(SubscribeError::Forbidden {
            identity: identity.clone(),
            project: project.clone(),
            index,
            interest: interest.clone(),
        })
    }

    /// A stream slot, counting what the identity holds on other instances.
    fn take_slot(
        &self,
        identity: &Principal,
        project: &ProjectId,
        dialect: Dialect,
    ) -> Result<crate::limits::ConnectionSlot, SubscribeError> {
        // Infisical bounds a project's streams, all identities together.
        let cap = match dialect {
            Dialect::Native => ProjectCap::PerIdentity,
            Dialect::Infisical => ProjectCap::AllIdentities,
        };
        let elsewhere = self
            .cluster
            .as_ref()
            .map(|c| c.streams_elsewhere(identity, project))
            .unwrap_or_default();
        self.limiter
            .acquire_as(identity, project, elsewhere, cap)
            .map_err(|limit| {
                self.metrics
                    .limit_rejections
                    .with_label_values(&[limit.label()])
                    .inc();
                SubscribeError::Limited {
                    limit,
                    value: self.limiter.value(limit),
                    identity: identity.clone(),
                    project: project.clone(),
                }
            })
    }

    /// Counts one subscribe's outcome.
    pub fn count<T>(&self, outcome: &Result<T, SubscribeError>) {
        let label = outcome
            .as_ref()
            .map_or_else(SubscribeError::label, |_| "accepted");
        self.metrics.subscriptions.with_label_values(&[label]).inc();
    }
}

/// Aborts its task when dropped (with the stream that holds it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks the token's provider again about every `cache_ttl` (jittered by up
/// to a tenth, so that streams opened together do not ask together) while
/// the stream is open. A token the provider says is no longer active closes
/// the stream with `token_revoked`; so does a provider that has not answered
/// for `max_stale` (a blip does not close every stream at once).
fn recheck_while_open(recheck: Recheck, handle: &Arc<StreamHandle>) -> AbortOnDrop {
    let stream = Arc::downgrade(handle);
    AbortOnDrop(tokio::spawn(async move {
        let every = recheck.introspector.recheck_every();
        let tenth = u64::try_from(every.as_millis() / 10)
            .unwrap_or(u64::MAX)
            .max(1);
        let mut confirmed = tokio::time::Instant::now();
        loop {
            let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..tenth);
            tokio::time::sleep(every - Duration::from_millis(jitter).min(every)).await;
            let active = recheck.introspector.is_active(&recheck.token).await;
            let Some(stream) = stream.upgrade() else {
                return;
            };
            match active {
                Ok(true) => confirmed = tokio::time::Instant::now(),
                Ok(false) => {
                    stream.close(Close::TokenRevoked);
                    return;
                }
                Err(_) if confirmed.elapsed() > recheck.introspector.max_stale() => {
                    stream.close(Close::TokenRevoked);
                    return;
                }
                Err(_) => {}
            }
        }
    }))
}

/// The caller a token names; a refusal is counted by reason.
pub(crate) async fn verify(
    verifier: &Verifier,
    metrics: &Metrics,
    token: Option<&str>,
) -> Result<Caller, AuthError> {
    let result = match token {
        None => Err(AuthError::Missing),
        Some(t) => verifier.verify(t).await,
    };
    result.inspect_err(|e| {
        metrics.auth_failures.with_label_values(&[e.reason()]).inc();
    })
}
