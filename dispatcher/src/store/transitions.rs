//! State changes and notes: the compare-and-set primitive the lifecycle
//! ([`crate::lifecycle`]) moves tasks with. It writes what a [`Step`] says: the state,
//! reason, message, exit code, attempt, GPU class and stage timestamps as values chosen in
//! Rust, the settled compute cost of a task that ends, and the event row, in one
//! transaction.

use sqlx::{Any, Transaction};
use tracing::instrument;

use super::quotas::Admission;
use super::{During as _, Result, Store, StoreError, row};
use crate::store::row::{millis, task_columns};
use crate::task::lifecycle::{PlannedNote, Stamp, Step};
use crate::task::{Breakdown, Reason, Task, TaskId, TaskState};

impl Store {
    /// Compare-and-set: moves task `id` from `step.from` to `step.to`, writes the step's
    /// values and the event, in one transaction. When the task ends, `settle` prices it
    /// as it is now (its compute cost is fixed in the same transaction). `Ok(None)`
    /// (nothing written) when the task does not exist or is not in `step.from`;
    /// [`StoreError::OverQuota`] (nothing written) when the step is for tasks within their
    /// tenant's quota only and this one is not; [`StoreError::IllegalTransition`] (nothing written) when `step.from` may never move
    /// to `step.to`.
    #[instrument(level = "debug", skip_all, fields(task_id = %id, from = %step.from, to = %step.to))]
    pub async fn transition(
        &self,
        id: TaskId,
        step: &Step,
        settle: impl FnOnce(&Task) -> Option<Breakdown> + Send,
    ) -> Result<Option<Task>> {
        self.timed("transition", async {
            let (from, to) = (step.from, step.to);
            if !from.can_move_to(to) {
                return Err(StoreError::IllegalTransition {
                    task_id: id,
                    from,
                    to,
                });
            }
            let during = || format!("moving task {id} from {from} to {to}");
            let now = millis(step.at);
            let sql = update_for(step);
            let mut tx = self.begin_write().await.during(during)?;
            if step.within_quota {
                match Self::admit_claim(&mut tx, id, from, now).await {
                    Ok(Admission::Admitted) => {}
                    Ok(Admission::NotInState) => {
                        tx.rollback().await.during(during)?;
                        return Ok(None);
                    }
                    Err(error) => {
                        tx.rollback().await.during(during)?;
                        return Err(error);
                    }
                }
            }
            // Every fragment of `sql` is ours; values are only ever bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id.to_string())
                .bind(from.as_str())
                .bind(to.as_str())
                .bind(step.reason.map(Reason::as_str))
                .bind(step.message.as_deref())
                .bind(step.exit_code)
                .bind(now);
            if let Some(attempt) = step.attempt {
                query = query.bind(attempt as i32);
            }
            if let Some(class) = &step.gpu_class {
                query = query.bind(class.as_str());
            }
            let updated = query.fetch_optional(&mut *tx).await.during(during)?;
            let Some(updated) = updated else {
                tx.rollback().await.during(during)?;
                return Ok(None);
            };
            let mut task = row::task(&updated)?;
            if task.state.is_terminal()
                && let Some(compute) = settle(&task)
            {
                sqlx::query(
                    "UPDATE tasks SET gpu_cost_dollars = $2, cpu_cost_dollars = $3, \
                     memory_cost_dollars = $4 WHERE id = $1",
                )
                .bind(id.to_string())
                .bind(compute.gpu)
                .bind(compute.cpu)
                .bind(compute.memory)
                .execute(&mut *tx)
                .await
                .during(during)?;
                task.spent.compute = Some(compute);
            }
            insert_event(&mut tx, id, Some(from), &task, now)
                .await
                .during(during)?;
            tx.commit().await.during(during)?;
            Ok(Some(task))
        })
        .await
    }

    /// Records why a task waits without changing its state (a pod no node can hold): sets
    /// the task's `reason` and `message` if it is still in `note.state`, and writes an
    /// event `state → state` carrying them, in one transaction. `Ok(None)` (nothing
    /// written) when the task does not exist or is not in that state; noting what the
    /// task already says writes nothing and returns it. A terminal task keeps its outcome:
    /// [`StoreError::IllegalTransition`].
    #[instrument(level = "debug", skip_all, fields(task_id = %id, state = %note.state, reason = %note.reason))]
    pub async fn record_note(&self, id: TaskId, note: &PlannedNote) -> Result<Option<Task>> {
        let PlannedNote {
            state,
            reason,
            ref message,
            at,
        } = *note;
        self.timed("note", async {
            if state.is_terminal() {
                return Err(StoreError::IllegalTransition {
                    task_id: id,
                    from: state,
                    to: state,
                });
            }
            let during = || format!("noting {reason} on task {id}");
            let now = millis(at);
            let mut tx = self.begin_write().await.during(during)?;
            let updated = sqlx::query(concat!(
                "UPDATE tasks SET reason = $3, message = $4, updated_at = $5 \
                 WHERE id = $1 AND state = $2 \
                 AND (reason IS NULL OR reason <> $3 OR message IS NULL OR message <> $4) \
                 RETURNING ",
                task_columns!()
            ))
            .bind(id.to_string())
            .bind(state.as_str())
            .bind(reason.as_str())
            .bind(message.as_str())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .during(during)?;
            let Some(updated) = updated else {
                tx.rollback().await.during(during)?;
                // Either already noted (the task as it is) or no longer in `state` (None).
                return Ok(self.task(id).await?.filter(|task| task.state == state));
            };
            let task = row::task(&updated)?;
            insert_event(&mut tx, id, Some(state), &task, now)
                .await
                .during(during)?;
            tx.commit().await.during(during)?;
            Ok(Some(task))
        })
        .await
    }
}

/// The compare-and-set `UPDATE` of `step`: `$1` id, `$2` the expected state, `$3` the new
/// state, `$4` reason, `$5` message, `$6` exit code, `$7` the step's time, then `$8` the
/// attempt and `$9` (or `$8`) the GPU class when the step sets them. Each stage timestamp
/// is written as its [`Stamp`] says; a new attempt forgets the last one's heartbeat. A
/// step for unexpired tasks only also needs the queue TTL not run out by `$7`.
fn update_for(step: &Step) -> String {
    let mut sets = vec![
        "state = $3".to_owned(),
        "reason = $4".to_owned(),
        "message = $5".to_owned(),
        "exit_code = $6".to_owned(),
        "updated_at = $7".to_owned(),
    ];
    let stamps = &step.stamps;
    for (column, stamp) in [
        ("queued_at", stamps.queued_at),
        ("launched_at", stamps.launched_at),
        ("started_at", stamps.started_at),
        ("finished_at", stamps.finished_at),
    ] {
        match stamp {
            Stamp::Keep => {}
            Stamp::Now => sets.push(format!("{column} = $7")),
            Stamp::NowIfUnset => sets.push(format!("{column} = COALESCE({column}, $7)")),
            Stamp::Clear => sets.push(format!("{column} = NULL")),
        }
    }
    let mut next = 8;
    if step.attempt.is_some() {
        sets.push(format!("attempt = ${next}"));
        sets.push("last_heartbeat_at = NULL".to_owned());
        sets.push("last_heartbeat = NULL".to_owned());
        next += 1;
    }
    if step.gpu_class.is_some() {
        sets.push(format!("gpu_class = ${next}"));
    }
    let unexpired = if step.unexpired_only {
        " AND (expires_at IS NULL OR expires_at > $7)"
    } else {
        ""
    };
    format!(
        concat!(
            "UPDATE tasks SET {} WHERE id = $1 AND state = $2{} RETURNING ",
            task_columns!()
        ),
        sets.join(", "),
        unexpired
    )
}

/// The event row of `task` reaching its current state from `from`.
pub(super) async fn insert_event(
    tx: &mut Transaction<'static, Any>,
    id: TaskId,
    from: Option<TaskState>,
    task: &Task,
    at: i64,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO task_events \
         (task_id, attempt, from_state, to_state, reason, message, exit_code, at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id.to_string())
    .bind(task.attempt as i32)
    .bind(from.map(TaskState::as_str))
    .bind(task.state.as_str())
    .bind(task.reason.map(Reason::as_str))
    .bind(task.message.as_deref())
    .bind(task.exit_code)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::update_for;
    use crate::task::TaskState;
    use crate::task::lifecycle::Step;

    #[test]
    fn the_update_writes_what_the_step_says() {
        let claim = update_for(&Step::new(TaskState::Queued, TaskState::Launching));
        assert!(claim.starts_with(
            "UPDATE tasks SET state = $3, reason = $4, message = $5, exit_code = $6, \
             updated_at = $7 WHERE id = $1 AND state = $2 RETURNING "
        ));
        let mut guarded = Step::new(TaskState::Queued, TaskState::Launching);
        guarded.unexpired_only = true;
        assert!(update_for(&guarded).contains(
            "WHERE id = $1 AND state = $2 AND (expires_at IS NULL OR expires_at > $7) RETURNING"
        ));
        let running = update_for(&Step::new(TaskState::Launched, TaskState::Running));
        assert!(running.contains(
            "launched_at = COALESCE(launched_at, $7), started_at = COALESCE(started_at, $7) WHERE"
        ));
        let fallback = update_for(
            &Step::new(TaskState::Launched, TaskState::Queued)
                .attempt(2)
                .gpu_class("a100"),
        );
        assert!(fallback.contains(
            "queued_at = $7, launched_at = NULL, started_at = NULL, attempt = $8, \
             last_heartbeat_at = NULL, last_heartbeat = NULL, gpu_class = $9 WHERE"
        ));
        let ended = update_for(&Step::new(TaskState::Running, TaskState::Failed));
        assert!(ended.contains("finished_at = $7 WHERE"));
        for sql in [claim, running, fallback, ended] {
            for state in TaskState::ALL {
                assert!(!sql.contains(&format!("'{state}'")), "{sql}");
            }
        }
    }
}
