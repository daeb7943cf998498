//! The retention of task output: a periodic sweep deletes the log lines of tasks that
//! ended longer ago than `--log-retention`, in bounded batches, so a large backlog never
//! becomes one long transaction. Every dispatcher process sweeps; deleting a line twice
//! is harmless.

use std::time::Duration;

use crate::metrics::Metrics;
use crate::store::Store;

/// Lines deleted per statement.
pub const PURGE_BATCH: u32 = 5000;
/// The pause between two full batches, so a backlog leaves the database room for others.
const BETWEEN_BATCHES: Duration = Duration::from_millis(100);

/// How often the sweep runs for `retention`: a tenth of it, between 1 s and 10 min.
#[must_use]
pub fn sweep_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_mins(10))
}

/// Deletes what `retention` lets go, now and then every [`sweep_interval`], until
/// `shutdown`.
pub async fn run_log_retention(
    store: Store,
    metrics: Metrics,
    retention: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let every = sweep_interval(retention);
    let retention = jiff::SignedDuration::try_from(retention).unwrap_or(jiff::SignedDuration::MAX);
    while !*shutdown.borrow() {
        let now = jiff::Timestamp::now();
        let cutoff = now.checked_sub(retention).unwrap_or(jiff::Timestamp::MIN);
        let purged = store.purge_logs(cutoff, PURGE_BATCH).await;
        if let Ok(deleted) = purged {
            metrics.reports().log_lines_purged(deleted);
        }
        let pause = match purged {
            Ok(deleted) if deleted >= u64::from(PURGE_BATCH) => BETWEEN_BATCHES,
            Ok(deleted) => {
                if deleted > 0 {
                    tracing::info!(deleted, "purged task log lines past their retention");
                }
                every
            }
            Err(error) => {
                tracing::warn!(error = %error, "purging task logs failed");
                every
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_runs_a_tenth_of_the_retention_within_bounds() {
        assert_eq!(
            sweep_interval(Duration::from_hours(168)),
            Duration::from_mins(10)
        );
        assert_eq!(
            sweep_interval(Duration::from_mins(10)),
            Duration::from_mins(1)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
    }
}
