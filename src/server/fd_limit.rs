//! The open-file limit: every connection holds a file descriptor, so berth raises its soft
//! `RLIMIT_NOFILE` to the hard limit at start and keeps its connection caps below what is left
//! after a reserve for cache files, origin connections and the runtime.
//!
//! Architecture: docs/ARCHITECTURE.md, "Request path".

use rlimit::Resource;

/// Descriptors kept out of the connection caps for everything else berth opens (cache files,
/// origin connections, the runtime's own).
pub const RESERVE: u64 = 256;

/// The smallest cap a listener is given however low the limit, so that berth still serves.
const MIN_CAP: usize = 16;

/// Fallback ceiling when the hard limit is "unlimited" and the kernel refuses that as a soft
/// limit (Linux caps it at `fs.nr_open`, 1,048,576 by default).
const UNLIMITED_FALLBACK: u64 = 1 << 20;

/// A soft and a hard `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The limit in force.
    pub soft: u64,
    /// The ceiling an unprivileged process may raise the soft limit to.
    pub hard: u64,
}

/// The process's current limit, if the platform has one.
pub fn current() -> Option<FdLimit> {
    Resource::NOFILE
        .get()
        .ok()
        .map(|(soft, hard)| FdLimit { soft, hard })
}

/// Raises the soft limit to the hard one; returns the limits before and after.
pub fn raise() -> std::io::Result<(FdLimit, FdLimit)> {
    let (soft, hard) = Resource::NOFILE.get()?;
    let before = FdLimit { soft, hard };
    if rlimit::increase_nofile_limit(u64::MAX).is_err() {
        rlimit::increase_nofile_limit(UNLIMITED_FALLBACK)?;
    }
    let (soft, hard) = Resource::NOFILE.get()?;
    Ok((before, FdLimit { soft, hard }))
}

/// The client and admin connection caps that fit `soft` descriptors: the admin cap first (it is
/// small), the client cap from what is left after [`RESERVE`]; never below a small floor.
pub fn caps(client_max: usize, admin_max: usize, soft: Option<u64>) -> (usize, usize) {
    let Some(soft) = soft else {
        return (client_max, admin_max);
    };
    let usable = usize::try_from(soft.saturating_sub(RESERVE)).unwrap_or(usize::MAX);
    let admin = admin_max.min(usable / 8).max(MIN_CAP.min(admin_max));
    let client = client_max
        .min(usable.saturating_sub(admin))
        .max(MIN_CAP.min(client_max));
    (client, admin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_the_limit() {
        assert_eq!(caps(10_000, 64, Some(1024)), (704, 64));
        assert_eq!(caps(10_000, 64, Some(1 << 20)), (10_000, 64));
        assert_eq!(caps(100, 64, Some(1024)), (100, 64));
        assert_eq!(caps(10_000, 64, None), (10_000, 64));
        let (client, admin) = caps(10_000, 64, Some(300));
        assert!(client >= 16 && admin >= 5, "{client} {admin}");
    }
}
