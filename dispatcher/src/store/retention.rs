//! The retention of ended tasks: deleting, in bounded batches, the tasks that ended
//! before a cutoff, with everything that hangs off them (the foreign keys cascade:
//! events, attempts, labels, reports, output lines and totals, webhook deliveries and
//! their attempts).
//!
//! Invariants: only tasks in a final state with a `finished_at` before the cutoff are
//! deleted; one call deletes at most `limit` tasks, in one statement.

use std::fmt::Write as _;

use super::row::millis;
use super::{During as _, Result, Store};
use crate::task::TaskState;

impl Store {
    /// Deletes at most `limit` tasks that ended before `ended_before`; their events,
    /// attempts, reports, output, totals and webhook deliveries go with them (the
    /// foreign keys cascade). How many were deleted (fewer than `limit`: nothing more to
    /// purge for now). The queued-task counters are untouched: an ended task is not
    /// queued.
    pub async fn purge_ended_tasks(
        &self,
        ended_before: jiff::Timestamp,
        limit: u32,
    ) -> Result<u64> {
        self.timed("purge_ended_tasks", async {
            let during = || "purging ended tasks past their retention".to_owned();
            let terminal: Vec<&str> = TaskState::ALL
                .iter()
                .filter(|state| state.is_terminal())
                .map(|state| state.as_str())
                .collect();
            let mut sql = String::from(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks \
                 WHERE finished_at IS NOT NULL AND finished_at < $1 AND state IN (",
            );
            for index in 0..terminal.len() {
                if index > 0 {
                    sql.push_str(", ");
                }
                let _ = write!(sql, "${}", index + 3);
            }
            sql.push_str(") LIMIT $2)");
            // Every fragment of `sql` is ours; values are only ever bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(millis(ended_before))
                .bind(i64::from(limit));
            for state in terminal {
                query = query.bind(state);
            }
            Ok(query
                .execute(&self.pool)
                .await
                .during(during)?
                .rows_affected())
        })
        .await
    }
}
