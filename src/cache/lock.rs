//! The cache directory's lock (docs/ARCHITECTURE.md, "Cache"): one berth process (serve, warm,
//! export, import) per cache directory, held for as long as its [`crate::cache::Cache`] is open.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::Path;
use std::time::Duration;

/// An exclusive lock on `<dir>/lock`, released when dropped.
pub(super) struct DirLock {
    _file: File,
}

/// Takes the cache directory's lock: one berth process (serve, warm, export, import) per cache
/// directory. Waits briefly for a process that is shutting down.
pub(super) fn lock_dir(dir: &Path) -> io::Result<DirLock> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    for _ in 0..50 {
        match f.try_lock() {
            Ok(()) => return Ok(DirLock { _file: f }),
            Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(100)),
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        format!(
            "{} is in use by another berth process (warm a running berth with --via URL)",
            dir.display()
        ),
    ))
}
