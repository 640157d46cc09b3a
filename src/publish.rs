//! The publish use case: validate a batch of events, check the `publish`
//! permission for each, and hand them to the bus (a success means the bus
//! has them: flushed to NATS, or stored by JetStream).
//!
//! Every refusal is a typed [`PublishError`]; nothing is published unless
//! every event of the batch is valid and allowed. Nothing here knows HTTP.

use std::sync::Arc;

use serde_json::Value;

use crate::auth::{AuthError, Caller, Verifier};
use crate::bus::{Bus, BusError, Published};
use crate::event::{Event, EventError, EventErrorKind, EventKey};
use crate::ident::Principal;
use crate::metrics::Metrics;
use crate::policy::{Action, Authorizer};
use crate::request::{BodyError, RequestError, RequestErrorKind};

/// Why nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No valid token.
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// The request is not one event or a batch of 1..=N.
    #[error(transparent)]
    Invalid(#[from] RequestError),
    /// Its body could not be taken.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// Event `index` (of a batch) is not a valid event.
    #[error("{}{source}", index.map(|i| format!("[{i}].")).unwrap_or_default())]
    InvalidEvent {
        /// Its place in the batch, if the request was a batch.
        index: Option<usize>,
        /// What is wrong with it.
        #[source]
        source: EventError,
        /// The configured size limit (for `too_large`).
        limit: usize,
    },
    /// The caller may not publish event `index`.
    #[error("{identity} may not publish {key}")]
    Forbidden {
        /// Its place in the batch.
        index: usize,
        /// Who asked.
        identity: Principal,
        /// The event's address.
        key: EventKey,
    },
    /// The bus cannot take events now.
    #[error("the event bus is unavailable; retry later")]
    BusUnavailable(#[source] BusError),
}

impl PublishError {
    /// The result label of `herald_publishes_total{result}`.
    pub fn label(&self) -> &'static str {
        match self {
            PublishError::Unauthorized(AuthError::ProviderUnavailable) => "provider_unavailable",
            PublishError::Unauthorized(_) => "unauthorized",
            PublishError::Invalid(_)
            | PublishError::Body(_)
            | PublishError::InvalidEvent { .. } => "bad_request",
            PublishError::Forbidden { .. } => "forbidden",
            PublishError::BusUnavailable(_) => "bus_unavailable",
        }
    }

    /// Every label [`label`](Self::label) can return, and `accepted`.
    pub const LABELS: &'static [&'static str] = &[
        "accepted",
        "unauthorized",
        "bad_request",
        "forbidden",
        "bus_unavailable",
        "provider_unavailable",
    ];

    /// Whether the event was refused for its size (413 rather than 400).
    pub fn is_too_large(&self) -> bool {
        matches!(self, PublishError::InvalidEvent { source, .. } if source.kind == EventErrorKind::TooLarge)
    }
}

/// Everything publishing needs.
pub struct Publisher {
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// The policy in force.
    pub authorizer: Arc<Authorizer>,
    /// Where events go.
    pub bus: Arc<Bus>,
    /// Largest event (canonical JSON).
    pub max_event_bytes: usize,
    /// Most events per request.
    pub max_batch: usize,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Publisher {
    /// The caller a token names.
    pub async fn caller(&self, token: Option<&str>) -> Result<Caller, PublishError> {
        Ok(crate::subscribe::verify(&self.verifier, &self.metrics, token).await?)
    }

    /// Publishes one event (an object) or a batch (an array), all or nothing.
    pub async fn publish(
        &self,
        caller: &Caller,
        body: Value,
    ) -> Result<Vec<Published>, PublishError> {
        let (items, batch) = match body {
            Value::Array(a) => (a, true),
            v => (vec![v], false),
        };
        if items.is_empty() || items.len() > self.max_batch {
            return Err(RequestError::new(
                RequestErrorKind::InvalidBatch,
                "body",
                format!(
                    "between 1 and {} events are accepted per request",
                    self.max_batch
                ),
            )
            .into());
        }
        let mut events = Vec::with_capacity(items.len());
        for (i, v) in items.into_iter().enumerate() {
            let ev = Event::from_json(v, self.max_event_bytes).map_err(|source| {
                self.metrics
                    .events_rejected
                    .with_label_values(&[source.kind.label()])
                    .inc();
                PublishError::InvalidEvent {
                    index: batch.then_some(i),
                    source,
                    limit: self.max_event_bytes,
                }
            })?;
            events.push(ev);
        }
        if let Some((index, ev)) = events.iter().enumerate().find(|(_, ev)| {
            !self
                .authorizer
                .may(&caller.subject, &ev.key, Action::Publish)
        }) {
            self.metrics
                .permission_denied
                .with_label_values(&["publish"])
                .inc();
            return Err(PublishError::Forbidden {
                index,
                identity: caller.identity.clone(),
                key: ev.key.clone(),
            });
        }
        self.bus
            .publish(events)
            .await
            .map_err(PublishError::BusUnavailable)
    }

    /// Counts one publish's outcome.
    pub fn count<T>(&self, outcome: &Result<T, PublishError>) {
        let label = outcome
            .as_ref()
            .map_or_else(PublishError::label, |_| "accepted");
        self.metrics.publishes.with_label_values(&[label]).inc();
    }
}
