//! The recency saver (docs/ARCHITECTURE.md, "On disk"): the cache's eviction order is written
//! every [`RECENCY_INTERVAL`] and once more at shutdown, so a restart keeps what was hot.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::proxy::App;

/// How often the cache's recency order is saved.
const RECENCY_INTERVAL: Duration = Duration::from_secs(30);

/// Saves the cache's recency order every [`RECENCY_INTERVAL`] and once more at shutdown.
pub(super) async fn save_recency(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(RECENCY_INTERVAL) => false,
            _ = shutdown.changed() => true,
        };
        let a = app.clone();
        let saved = tokio::task::spawn_blocking(move || a.cache().save_recency()).await;
        if let Ok(Err(e)) = saved {
            tracing::warn!(error = %e, "could not save cache recency");
        }
        if stop {
            return;
        }
    }
}
