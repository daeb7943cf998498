//! Every task's history: one row per state change or note, in the order written.

use super::{During as _, Result, Store, row};
use crate::store::row::event_columns;
use crate::task::{Reason, TaskId, TaskState};

/// The most followed tasks one read of [`Store::events_of_followed`] covers: two bound
/// values each, well below every backend's limit on bound values.
pub const FOLLOWED_PER_READ: usize = 200;

/// One row of a task's history: a state change with the attempt it belongs to, or a note
/// ([`Store::record_note`]) where `from` and `to` are the same state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEvent {
    pub id: i64,
    pub task_id: TaskId,
    pub attempt: u32,
    /// `None` for the task's creation.
    pub from: Option<TaskState>,
    pub to: TaskState,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    pub at: jiff::Timestamp,
}

impl Store {
    /// Task `id`'s events in the order they happened, only those after `after_event_id`.
    pub async fn events(&self, id: TaskId, after_event_id: Option<i64>) -> Result<Vec<TaskEvent>> {
        self.timed("events", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                event_columns!(),
                " FROM task_events WHERE task_id = $1 AND id > $2 ORDER BY id"
            ))
            .bind(id.to_string())
            .bind(after_event_id.unwrap_or(0))
            .fetch_all(&self.pool)
            .await
            .during(|| format!("reading the events of task {id}"))?;
            rows.iter().map(row::event).collect()
        })
        .await
    }

    /// The events of followed tasks newer than each one's cursor (`followed`: a task and
    /// the last event id of it already read, 0 for none), in id order per read: the
    /// shared poller's one read per tick for up to [`FOLLOWED_PER_READ`] followed tasks
    /// (one more read per that many more). Each read returns at most `limit_per_read`
    /// rows; for every task, the rows returned are the next ones after its cursor without
    /// a gap, so moving each cursor to its last returned row and reading again misses
    /// nothing.
    pub async fn events_of_followed(
        &self,
        followed: &[(TaskId, i64)],
        limit_per_read: u32,
    ) -> Result<Vec<TaskEvent>> {
        let mut events = Vec::new();
        for chunk in followed.chunks(FOLLOWED_PER_READ) {
            events.extend(self.events_of_followed_read(chunk, limit_per_read).await?);
        }
        Ok(events)
    }

    async fn events_of_followed_read(
        &self,
        followed: &[(TaskId, i64)],
        limit: u32,
    ) -> Result<Vec<TaskEvent>> {
        self.timed("events_of_followed", async {
            // `(task_id = $1 AND id > $2) OR …`: each disjunct is a range of the
            // (task_id, id) index.
            let clauses: Vec<String> = (0..followed.len())
                .map(|i| format!("(task_id = ${} AND id > ${})", 2 * i + 1, 2 * i + 2))
                .collect();
            let sql = format!(
                concat!(
                    "SELECT ",
                    event_columns!(),
                    " FROM task_events WHERE {} ORDER BY id LIMIT ${}"
                ),
                clauses.join(" OR "),
                2 * followed.len() + 1
            );
            // Every fragment above is ours; values are only ever bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (task, after) in followed {
                query = query.bind(task.to_string()).bind(*after);
            }
            let rows = query
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .during(|| format!("reading the events of {} followed tasks", followed.len()))?;
            rows.iter().map(row::event).collect()
        })
        .await
    }
}
