//! Retention: periodic sweeps delete, in bounded batches, the output lines of tasks that
//! ended longer ago than `--log-retention`, and the tasks themselves (with their events,
//! attempts, reports and webhook deliveries) that ended longer ago than
//! `--task-retention`, so a large backlog never becomes one long transaction and the
//! database grows with the load, not with history. Every dispatcher process sweeps;
//! deleting twice is harmless.

use std::time::Duration;

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Rows deleted per statement.
pub const PURGE_BATCH: u32 = 5000;
/// Tasks deleted per statement (each takes its events, reports and lines with it).
pub const TASK_PURGE_BATCH: u32 = 500;
/// The shortest `--task-retention`: a month's spend and budgets are summed from the
/// tasks that ended in it, so none of this month's may go.
pub const MIN_TASK_RETENTION: Duration = Duration::from_hours(32 * 24);
/// The pause between two full batches, so a backlog leaves the database room for others.
const BETWEEN_BATCHES: Duration = Duration::from_millis(100);

/// What a sweep deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Output lines of ended tasks.
    Logs,
    /// Ended tasks, whole.
    Tasks,
}

impl Sweep {
    fn batch(self) -> u32 {
        match self {
            Self::Logs => PURGE_BATCH,
            Self::Tasks => TASK_PURGE_BATCH,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Logs => "task log lines",
            Self::Tasks => "ended tasks",
        }
    }

    async fn purge(self, store: &Store, cutoff: jiff::Timestamp) -> Result<u64, StoreError> {
        match self {
            Self::Logs => store.purge_logs(cutoff, self.batch()).await,
            Self::Tasks => store.purge_ended_tasks(cutoff, self.batch()).await,
        }
    }

    fn count(self, metrics: &Metrics, deleted: u64) {
        match self {
            Self::Logs => metrics.reports().log_lines_purged(deleted),
            Self::Tasks => metrics.reports().tasks_purged(deleted),
        }
    }
}

/// How often the sweep runs for `retention`: a tenth of it, between 1 s and 10 min.
#[must_use]
pub fn sweep_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_mins(10))
}

/// Deletes what `retention` lets go, now and then every [`sweep_interval`], until
/// `shutdown`. Without a `retention` everything is kept: the sweep does not run.
pub async fn run_retention(
    sweep: Sweep,
    store: Store,
    metrics: Metrics,
    retention: Option<Duration>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Some(retention) = retention else {
        return;
    };
    let every = sweep_interval(retention);
    let retention = jiff::SignedDuration::try_from(retention).unwrap_or(jiff::SignedDuration::MAX);
    while !*shutdown.borrow() {
        let now = jiff::Timestamp::now();
        let cutoff = now.checked_sub(retention).unwrap_or(jiff::Timestamp::MIN);
        let purged = sweep.purge(&store, cutoff).await;
        if let Ok(deleted) = purged {
            sweep.count(&metrics, deleted);
        }
        let pause = match purged {
            Ok(deleted) if deleted >= u64::from(sweep.batch()) => BETWEEN_BATCHES,
            Ok(deleted) => {
                if deleted > 0 {
                    tracing::info!(deleted, "purged {} past their retention", sweep.what());
                }
                every
            }
            Err(error) => {
                tracing::warn!(error = %error, "purging {} failed", sweep.what());
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
