//! Retries in the store: the attempt list of a task, and releasing retries whose backoff
//! ended so a launcher takes them. Attempt rows are written by [`Store::transition`], in
//! the transaction of the move that ended the attempt.

use super::{During as _, Result, Store, row};
use crate::store::row::{attempt_columns, millis, task_columns};
use crate::task::{AttemptRecord, Task, TaskId, TaskState};

/// The most attempt rows one read returns (retries, free retries and fallbacks are all
/// bounded far below it).
const MAX_ATTEMPTS_LISTED: i64 = 200;

impl Store {
    /// The ended attempts of task `id`, first to last.
    pub async fn attempts(&self, id: TaskId) -> Result<Vec<AttemptRecord>> {
        self.timed("attempts", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                attempt_columns!(),
                " FROM task_attempts WHERE task_id = $1 ORDER BY attempt LIMIT $2"
            ))
            .bind(id.to_string())
            .bind(MAX_ATTEMPTS_LISTED)
            .fetch_all(&self.pool)
            .await
            .during(|| format!("reading the attempts of task {id}"))?;
            rows.iter()
                .map(|row| row::attempt_record(row, id))
                .collect()
        })
        .await
    }

    /// Releases queued tasks whose retry backoff ended by `now` (at most `limit`, the
    /// longest due first): clears their `next_attempt_at` with a compare-and-set, so of
    /// several launchers exactly one releases each, and returns them to be enqueued. A
    /// crash between this and the enqueue leaves a queued task the queue does not hold,
    /// which the launcher's reconciler enqueues.
    pub async fn release_due_retries(&self, now: jiff::Timestamp, limit: u32) -> Result<Vec<Task>> {
        self.timed("release_due_retries", async {
            let due: Vec<(String, i64)> = sqlx::query_as(
                "SELECT id, next_attempt_at FROM tasks WHERE state = $1 \
                 AND next_attempt_at <= $2 ORDER BY next_attempt_at LIMIT $3",
            )
            .bind(TaskState::Queued.as_str())
            .bind(millis(now))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .during(|| "listing retries whose backoff ended".to_owned())?;
            let mut released = Vec::with_capacity(due.len());
            for (id, not_before) in due {
                let row = sqlx::query(concat!(
                    "UPDATE tasks SET next_attempt_at = NULL \
                     WHERE id = $1 AND state = $2 AND next_attempt_at = $3 RETURNING ",
                    task_columns!()
                ))
                .bind(&id)
                .bind(TaskState::Queued.as_str())
                .bind(not_before)
                .fetch_optional(&self.pool)
                .await
                .during(|| format!("releasing the retry of task {id}"))?;
                if let Some(row) = row {
                    released.push(row::task(&row)?);
                }
            }
            Ok(released)
        })
        .await
    }
}
