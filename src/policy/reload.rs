//! Live policy: reloading the files on change and on SIGHUP, swapping in
//! only a fully valid policy, recording a failure, and telling the owner of
//! the open streams what changed (it closes the ones no longer allowed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::watch::FileWatch;
use super::{Authorizer, PolicySet, PolicySource};

/// The model and policy files a policy was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyFiles {
    /// The casbin model.
    pub model: PathBuf,
    /// The policy lines.
    pub policy: PathBuf,
}

impl PolicyFiles {
    /// Reads both.
    pub fn read(&self) -> Result<PolicySource, Vec<super::Problem>> {
        PolicySource::read(&self.model, &self.policy)
    }
}

/// Called with every policy swapped in; returns how many streams it closed.
pub type OnSwap = Box<dyn Fn(&PolicySet) -> usize + Send + Sync>;

/// Reloads the policy in force.
pub struct Reloader {
    authorizer: Arc<Authorizer>,
    files: Option<PolicyFiles>,
    on_swap: OnSwap,
}

impl Reloader {
    /// A reloader of `files` (none for the built-in policy) into `authorizer`.
    pub fn new(authorizer: Arc<Authorizer>, files: Option<PolicyFiles>, on_swap: OnSwap) -> Self {
        Self {
            authorizer,
            files,
            on_swap,
        }
    }

    /// Re-reads the files and swaps the policy in if it is fully valid; a
    /// broken policy leaves the one in force untouched, and its problems are
    /// logged with file and line and shown on `/admin/policy`.
    pub async fn reload(&self, why: &str) {
        let Some(files) = &self.files else {
            tracing::warn!(
                why,
                "the policy is the built-in copy; there are no files to reload"
            );
            return;
        };
        let loaded = match files.read() {
            Ok(src) => self.authorizer.reload(&src).await,
            Err(problems) => {
                self.authorizer.record_failure(problems.clone());
                Err(problems)
            }
        };
        match loaded {
            Ok(set) => {
                let revoked = (self.on_swap)(&set);
                tracing::info!(why, generation = set.generation, fingerprint = %set.fingerprint, revoked, "policy reloaded");
            }
            Err(problems) => {
                for p in &problems {
                    tracing::error!(why, problem = %p, "policy reload failed; the previous policy stays in force");
                }
            }
        }
    }

    /// Reloads on SIGHUP and, with `watch`, when the files change (polled
    /// every `interval`), until `stopped` resolves.
    pub async fn run(
        self,
        watch: bool,
        interval: Duration,
        stopped: impl std::future::Future<Output = ()>,
    ) {
        let mut watcher = self
            .files
            .as_ref()
            .filter(|_| watch)
            .map(|f| FileWatch::new(vec![f.model.clone(), f.policy.clone()]));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .inspect_err(|e| tracing::error!(error = %e, "cannot listen for SIGHUP"))
            .ok();
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
                _ = tick.tick(), if watcher.is_some() => {
                    if watcher.as_mut().is_some_and(FileWatch::poll) {
                        self.reload("file change").await;
                    }
                }
                _ = hangup => {
                    if let Some(w) = watcher.as_mut() {
                        w.mark_loaded();
                    }
                    self.reload("SIGHUP").await;
                }
            }
        }
    }
}
