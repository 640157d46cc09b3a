//! The one shutdown signal every task listens to, and the drain.
//!
//! Three phases, in order: running, draining (readiness fails, new streams are
//! told to reconnect, open streams are closed over the drain window), stopped
//! (listeners stop accepting). A [`Shutdown`] is cheap to clone; any clone can
//! advance the phase, and every clone can wait for a phase.
//!
//! [`drain`] is the choreography of a graceful stop: fail readiness, wait
//! `shutdown.grace` for load balancers to notice, tell every open stream to
//! reconnect (spread over `shutdown.drain_window`, each with a jittered
//! `retry:`), and wait for the router to be empty, all within
//! `shutdown.deadline`.

use rand::seq::SliceRandom;
use tokio::sync::watch;

use crate::protocol::{jittered_retry_ms, Close, ReconnectReason};
use crate::router::Router;
use crate::setting::{self, Invalid};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The lifecycle phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// Shutting down gracefully.
    Draining,
    /// Stop now.
    Stopped,
}

/// A handle on the shared phase.
#[derive(Clone)]
pub struct Shutdown {
    tx: watch::Sender<Phase>,
    rx: watch::Receiver<Phase>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A new signal in the running phase.
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(Phase::Running);
        Self { tx, rx }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Whether draining or stopped.
    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// Moves forward to `phase` (never back).
    pub fn advance(&self, phase: Phase) {
        self.tx.send_if_modified(|p| {
            if phase > *p {
                *p = phase;
                true
            } else {
                false
            }
        });
    }

    /// Waits until the phase is at least `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        // The sender lives in self, so the channel cannot close while we wait.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}
/// `[shutdown]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time between failing `/readyz` and closing streams, so a load balancer notices.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Window over which open streams are told to reconnect, spread evenly.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// Hard deadline for the whole shutdown.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(2),
            drain_window: Duration::from_secs(5),
            deadline: Duration::from_secs(15),
        }
    }
}

impl ShutdownConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (key, d) in [
            ("shutdown.grace", self.grace),
            ("shutdown.drain_window", self.drain_window),
            ("shutdown.deadline", self.deadline),
        ] {
            setting::duration(key, d, Duration::ZERO, setting::MAX_DURATION)?;
        }
        Ok(())
    }
}

/// Drains: readiness fails at once, then open streams are told to reconnect
/// (after `cfg.grace`, spread over `cfg.drain_window`, `retry:` jittered
/// around `retry`), and this returns when they are gone or at `cfg.deadline`.
/// The phase is `Stopped` afterwards.
pub async fn drain(shutdown: &Shutdown, router: &Router, cfg: &ShutdownConfig, retry: Duration) {
    let all = async {
        shutdown.advance(Phase::Draining);
        tracing::info!(streams = router.len(), "draining");
        if !router.is_empty() {
            tokio::time::sleep(cfg.grace).await;
        }
        let mut streams = router.connections();
        streams.shuffle(&mut rand::thread_rng());
        let n = streams.len().max(1) as u32;
        let start = tokio::time::Instant::now();
        for (i, s) in streams.iter().enumerate() {
            tokio::time::sleep_until(start + cfg.drain_window * i as u32 / n).await;
            s.close(Close::Reconnect {
                reason: ReconnectReason::Draining,
                retry_ms: jittered_retry_ms(retry),
            });
        }
        router.wait_empty().await;
    };
    if tokio::time::timeout(cfg.deadline, all).await.is_err() {
        tracing::warn!(streams = router.len(), "drain deadline reached");
    }
    shutdown.advance(Phase::Stopped);
}
