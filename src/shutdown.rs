//! The one shutdown signal every task listens to.
//!
//! Three phases, in order: running, draining (readiness fails, new streams are
//! told to reconnect, open streams are closed over the drain window), stopped
//! (listeners stop accepting). A [`Shutdown`] is cheap to clone; any clone can
//! advance the phase, and every clone can wait for a phase.

use tokio::sync::watch;

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
