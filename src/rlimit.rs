//! The process's open-file limit, and the share of it streams may take.
//!
//! Every stream is a socket. With a low soft `RLIMIT_NOFILE`, streams alone
//! could take every descriptor, and then the publish API, the admin listener
//! (health checks, metrics) and NATS reconnects fail with `EMFILE`. So
//! `serve` raises the soft limit to the hard one at start (as nginx's
//! `worker_rlimit_nofile` and Go's runtime do) and logs the figure, and the
//! per-instance stream cap is what that limit leaves after
//! `limits.reserved_fds`.

use crate::limits::LimitsConfig;

/// The open-file limits of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    /// The soft limit in force.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// The current limits, or `None` where they cannot be read.
pub fn current() -> Option<NoFile> {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
            // `rlim_t` is u64 on Linux but not on every Unix.
            #[allow(clippy::useless_conversion)]
            return Some(NoFile {
                soft: u64::from(r.rlim_cur),
                hard: u64::from(r.rlim_max),
            });
        }
    }
    None
}

/// Raises the soft limit to the hard one (or as close as the kernel allows)
/// and returns the limits in force afterwards.
pub fn raise() -> Option<NoFile> {
    let before = current()?;
    #[cfg(unix)]
    if before.soft < before.hard {
        // An unlimited hard limit cannot be the soft one for descriptors on
        // Linux (it stops at fs.nr_open): try it, then a large finite value.
        for want in [before.hard, before.hard.min(1 << 20)] {
            let r = libc::rlimit {
                rlim_cur: want as libc::rlim_t,
                rlim_max: before.hard as libc::rlim_t,
            };
            // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } == 0 {
                break;
            }
        }
    }
    current()
}

/// The most streams this instance may hold: `limits.max_connections`, or
/// less when the soft limit minus `limits.reserved_fds` cannot hold that many
/// (never less than a quarter of the soft limit, so a tiny limit still
/// serves some streams). `None` limits (unknown) leave the setting as it is.
pub fn stream_cap(limits: &LimitsConfig, nofile: Option<NoFile>) -> usize {
    let Some(n) = nofile else {
        return limits.max_connections;
    };
    let soft = usize::try_from(n.soft).unwrap_or(usize::MAX);
    let room = soft
        .saturating_sub(limits.reserved_fds)
        .max(soft / 4)
        .max(1);
    limits.max_connections.min(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve() {
        let l = LimitsConfig {
            max_connections: 50_000,
            reserved_fds: 256,
            ..LimitsConfig::default()
        };
        let lim = |soft| Some(NoFile { soft, hard: soft });
        assert_eq!(stream_cap(&l, lim(1_048_576)), 50_000);
        assert_eq!(stream_cap(&l, lim(20_000)), 20_000 - 256);
        assert_eq!(stream_cap(&l, lim(300)), 75, "a quarter of a tiny limit");
        assert_eq!(stream_cap(&l, None), 50_000);
    }

    #[test]
    fn raising_never_lowers() {
        let before = current().expect("readable here");
        let after = raise().expect("readable here");
        assert!(after.soft >= before.soft);
        assert_eq!(after.hard, before.hard);
    }
}
