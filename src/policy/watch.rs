//! Noticing policy edits: a content poll with a one-interval debounce.
//!
//! Polling the files' contents (not inotify) sees every way of saving: in
//! place, rename-and-replace, a Kubernetes ConfigMap's symlink swap. A change is
//! reported only once the same new content has been seen on two polls in a row,
//! so a file caught half-written, or several quick saves, end in one reload of
//! the final content. Reading a missing file counts as content too ("missing"),
//! so a file briefly absent during a rename does not reload anything when it
//! comes back unchanged.

use std::hash::{DefaultHasher, Hasher};
use std::path::PathBuf;

/// Watches a set of files by content.
pub struct FileWatch {
    paths: Vec<PathBuf>,
    loaded: u64,
    candidate: Option<u64>,
}

impl FileWatch {
    /// Starts watching; the current contents count as loaded.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let mut w = Self {
            paths,
            loaded: 0,
            candidate: None,
        };
        w.loaded = w.digest();
        w
    }

    fn digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for p in &self.paths {
            match std::fs::read(p) {
                Ok(bytes) => {
                    h.write_u8(1);
                    h.write(&bytes);
                }
                Err(_) => h.write_u8(0),
            }
        }
        h.finish()
    }

    /// Polls once; `true` when the contents changed and stayed the same since
    /// the previous poll: time to reload.
    pub fn poll(&mut self) -> bool {
        let now = self.digest();
        if now == self.loaded {
            self.candidate = None;
            return false;
        }
        if self.candidate == Some(now) {
            self.loaded = now;
            self.candidate = None;
            return true;
        }
        self.candidate = Some(now);
        false
    }

    /// Takes the current contents as loaded (after a reload triggered otherwise).
    pub fn mark_loaded(&mut self) {
        self.loaded = self.digest();
        self.candidate = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_change_once_it_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("policy.csv");
        std::fs::write(&f, "a").unwrap();
        let mut w = FileWatch::new(vec![f.clone()]);
        assert!(!w.poll());
        std::fs::write(&f, "ab").unwrap(); // half-written
        assert!(!w.poll());
        std::fs::write(&f, "abc").unwrap(); // finished
        assert!(!w.poll(), "changed since the last poll: not stable yet");
        assert!(w.poll(), "stable: reload");
        assert!(!w.poll(), "reported once");
    }

    #[test]
    fn a_file_briefly_missing_and_back_unchanged_is_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("policy.csv");
        std::fs::write(&f, "a").unwrap();
        let mut w = FileWatch::new(vec![f.clone()]);
        std::fs::remove_file(&f).unwrap();
        assert!(!w.poll());
        std::fs::write(&f, "a").unwrap();
        assert!(!w.poll());
        assert!(!w.poll());
    }
}
