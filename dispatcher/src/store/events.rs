//! Every task's history: one row per state change or note, in the order written.

use super::{During as _, Result, Store, row};
use crate::store::row::event_columns;
use crate::task::{Reason, TaskId, TaskState};

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
}
