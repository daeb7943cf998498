//! State changes and notes: the compare-and-set primitive the lifecycle
//! ([`crate::lifecycle`]) moves tasks with. It writes what a [`Step`] says: the state,
//! reason, message, exit code, attempt, GPU class and stage timestamps as values chosen in
//! Rust, the settled compute cost of a task that ends, the event row and the webhook
//! delivery the change makes (if the task's or its tenant's webhook wants it), in one
//! transaction.

use std::fmt::Write as _;

use sqlx::{Any, Transaction};
use tracing::instrument;

use super::quotas::Admission;
use super::{During as _, Result, Store, StoreError, row};
use crate::store::row::{millis, task_columns};
use crate::task::lifecycle::{PlannedNote, Stamp, Step};
use crate::task::retry::{FailureClass, RetryAction};
use crate::task::{AttemptRecord, Breakdown, Reason, Task, TaskId, TaskState};

impl Store {
    /// Compare-and-set: moves task `id` from `step.from` to `step.to`, writes the step's
    /// values and the event, in one transaction. When the task ends, `settle` prices it
    /// as it is now (its compute cost is fixed in the same transaction); a change a
    /// webhook is told of leaves a delivery in the outbox whose body `render` makes from
    /// the moved task and the event type, in the same transaction. `Ok(None)`
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
        render: &(dyn Fn(&Task, &'static str) -> String + Sync),
    ) -> Result<Option<Task>> {
        self.timed("transition", async {
            legal(id, step)?;
            let during = || format!("moving task {id} from {} to {}", step.from, step.to);
            let mut tx = self.begin_write().await.during(during)?;
            match move_in(&mut tx, id, step, settle, render).await {
                Ok(Some(task)) => {
                    tx.commit().await.during(during)?;
                    Ok(Some(task))
                }
                Ok(None) => {
                    tx.rollback().await.during(during)?;
                    Ok(None)
                }
                Err(error) => {
                    // Dropping the transaction would roll it back too, but later.
                    let _ = tx.rollback().await;
                    Err(error)
                }
            }
        })
        .await
    }

    /// Group commit: makes every move of `steps` as [`Store::transition`] would, in one
    /// transaction, each behind a savepoint so that one refused or failed move (not in
    /// its state, over quota, an error) leaves the others whole. One answer per step, in
    /// order, each as `transition` answers; every answer holds only if the transaction
    /// commits, so `Err` (nothing written) when it does not, or when a savepoint cannot
    /// be rolled back (the connection is gone). `settle` and `render` are as for
    /// `transition`, given the step too.
    #[instrument(level = "debug", skip_all, fields(steps = steps.len()))]
    pub async fn transitions(
        &self,
        steps: &[(TaskId, &Step)],
        settle: &(dyn Fn(&Task, &Step) -> Option<Breakdown> + Sync),
        render: &(dyn Fn(&Task, &'static str, &Step) -> String + Sync),
    ) -> Result<Vec<Result<Option<Task>>>> {
        self.timed("transition_batch", async {
            let during = || format!("moving {} tasks in one transaction", steps.len());
            let mut tx = self.begin_write().await.during(during)?;
            let mut answers = Vec::with_capacity(steps.len());
            for &(id, step) in steps {
                if let Err(error) = legal(id, step) {
                    answers.push(Err(error));
                    continue;
                }
                sqlx::query("SAVEPOINT step")
                    .execute(&mut *tx)
                    .await
                    .during(during)?;
                let render_step = |task: &Task, event: &'static str| render(task, event, step);
                let answer =
                    move_in(&mut tx, id, step, |task| settle(task, step), &render_step).await;
                let keep = matches!(answer, Ok(Some(_)));
                let end = if keep {
                    "RELEASE SAVEPOINT step"
                } else {
                    // ROLLBACK TO keeps the savepoint; release it so they do not pile up.
                    "ROLLBACK TO SAVEPOINT step; RELEASE SAVEPOINT step"
                };
                for statement in end.split("; ") {
                    sqlx::query(sqlx::AssertSqlSafe(statement))
                        .execute(&mut *tx)
                        .await
                        .during(during)?;
                }
                answers.push(answer);
            }
            tx.commit().await.during(during)?;
            Ok(answers)
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

/// Refuses a step the state machine never makes, before any transaction.
fn legal(id: TaskId, step: &Step) -> Result<()> {
    if step.from.can_move_to(step.to) {
        Ok(())
    } else {
        Err(StoreError::IllegalTransition {
            task_id: id,
            from: step.from,
            to: step.to,
        })
    }
}

/// The writes of one move within `tx` (see [`Store::transition`]); `Ok(None)` when the
/// task is not in `step.from`, leaving the caller to roll back.
async fn move_in(
    tx: &mut Transaction<'static, Any>,
    id: TaskId,
    step: &Step,
    settle: impl FnOnce(&Task) -> Option<Breakdown>,
    render: &(dyn Fn(&Task, &'static str) -> String + Sync),
) -> Result<Option<Task>> {
    let (from, to) = (step.from, step.to);
    let during = || format!("moving task {id} from {from} to {to}");
    let now = millis(step.at);
    let (sql, extra) = update_for(step)?;
    if step.within_quota
        && matches!(
            Store::admit_claim(tx, id, from, now).await?,
            Admission::NotInState
        )
    {
        return Ok(None);
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
    for value in extra {
        query = match value {
            Value::Int(value) => query.bind(value),
            Value::BigInt(value) => query.bind(value),
            Value::Real(value) => query.bind(value),
            Value::Text(value) => query.bind(value),
        };
    }
    let updated = query.fetch_optional(&mut **tx).await.during(during)?;
    let Some(updated) = updated else {
        return Ok(None);
    };
    let mut task = row::task(&updated)?;
    let queued_change = i64::from(to == TaskState::Queued) - i64::from(from == TaskState::Queued);
    if queued_change != 0 {
        super::quotas::count_queued(tx, &task.tenant, queued_change)
            .await
            .during(during)?;
    }
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
        .execute(&mut **tx)
        .await
        .during(during)?;
        task.spent.compute = Some(compute);
    }
    if task.state.is_terminal() {
        let compute = task.spent.compute.map_or(0.0, |compute| compute.total());
        super::spend::add_daily_spend(tx, &task.tenant, now, compute + task.spent.llm_dollars)
            .await
            .during(during)?;
    }
    if let Some(ended) = &step.ended_attempt {
        insert_attempt(tx, id, ended).await.during(during)?;
    }
    insert_event(tx, id, Some(from), &task, now)
        .await
        .during(during)?;
    super::webhooks::enqueue_delivery(tx, from, &task, now, render)
        .await
        .during(during)?;
    Ok(Some(task))
}

/// A value bound after the first seven parameters of an update.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(i32),
    BigInt(Option<i64>),
    Real(f64),
    Text(Option<String>),
}

/// The compare-and-set `UPDATE` of `step` and the values it binds after the first seven:
/// `$1` id, `$2` the expected state, `$3` the new state, `$4` reason, `$5` message, `$6`
/// exit code, `$7` the step's time, then `$8`… for what the step also sets (a new
/// attempt, its GPU class, a retry's counts, backoff, changes and earlier cost) and the
/// attempt it expects. Each stage timestamp is written as its [`Stamp`] says; a new
/// attempt forgets the last one's heartbeat. A claim also needs the queue TTL not run
/// out, and the retry backoff over, by `$7`.
fn update_for(step: &Step) -> Result<(String, Vec<Value>)> {
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
    let mut values = Vec::new();
    let mut set = |sets: &mut Vec<String>, column: &str, value: Value| {
        values.push(value);
        sets.push(format!("{column} = ${}", 7 + values.len()));
    };
    if let Some(attempt) = step.attempt {
        set(&mut sets, "attempt", Value::Int(attempt as i32));
        sets.push("last_heartbeat_at = NULL".to_owned());
        sets.push("last_heartbeat = NULL".to_owned());
    }
    if let Some(class) = &step.gpu_class {
        set(&mut sets, "gpu_class", Value::Text(Some(class.clone())));
    }
    if step.claimable_only {
        sets.push("next_attempt_at = NULL".to_owned());
    }
    if let Some(next) = &step.next_attempt {
        let corrupt = |e: serde_json::Error| StoreError::corrupt("a retry's change", e.to_string());
        set(
            &mut sets,
            "retries_used",
            Value::Int(next.retries.counted as i32),
        );
        set(
            &mut sets,
            "ignored_attempts",
            Value::Int(next.retries.ignored as i32),
        );
        set(
            &mut sets,
            "next_attempt_at",
            Value::BigInt(Some(millis(next.not_before))),
        );
        set(
            &mut sets,
            "expires_at",
            Value::BigInt(next.expires_at.map(millis)),
        );
        let earlier = &next.earlier_attempts;
        set(
            &mut sets,
            "earlier_gpu_cost_dollars",
            Value::Real(earlier.gpu),
        );
        set(
            &mut sets,
            "earlier_cpu_cost_dollars",
            Value::Real(earlier.cpu),
        );
        set(
            &mut sets,
            "earlier_memory_cost_dollars",
            Value::Real(earlier.memory),
        );
        if let Some(spec) = &next.spec {
            let json = serde_json::to_string(spec).map_err(corrupt)?;
            set(&mut sets, "spec", Value::Text(Some(json)));
        }
        if let Some(nodes) = &next.avoid_nodes {
            let json = serde_json::to_string(nodes).map_err(corrupt)?;
            set(&mut sets, "avoid_nodes", Value::Text(Some(json)));
        }
    }
    let mut guards = String::new();
    if step.claimable_only {
        guards.push_str(
            " AND (expires_at IS NULL OR expires_at > $7) \
             AND (next_attempt_at IS NULL OR next_attempt_at <= $7)",
        );
    }
    if let Some(attempt) = step.expected_attempt {
        values.push(Value::Int(attempt as i32));
        let _ = write!(guards, " AND attempt = ${}", 7 + values.len());
    }
    let sql = format!(
        concat!(
            "UPDATE tasks SET {} WHERE id = $1 AND state = $2{} RETURNING ",
            task_columns!()
        ),
        sets.join(", "),
        guards
    );
    Ok((sql, values))
}

/// The attempt-list row of an attempt that ended.
async fn insert_attempt(
    tx: &mut Transaction<'static, Any>,
    id: TaskId,
    ended: &AttemptRecord,
) -> std::result::Result<(), sqlx::Error> {
    let changes = serde_json::to_string(&ended.changes).unwrap_or_else(|_| "[]".to_owned());
    sqlx::query(
        "INSERT INTO task_attempts \
         (task_id, attempt, outcome, reason, failure_class, exit_code, message, node, \
          gpu_class, launched_at, started_at, ended_at, gpu_cost_dollars, cpu_cost_dollars, \
          memory_cost_dollars, action, decision, changes) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         ON CONFLICT (task_id, attempt) DO NOTHING",
    )
    .bind(id.to_string())
    .bind(ended.attempt as i32)
    .bind(ended.outcome.as_str())
    .bind(ended.reason.map(Reason::as_str))
    .bind(ended.failure_class.map(FailureClass::as_str))
    .bind(ended.exit_code)
    .bind(ended.message.as_deref())
    .bind(ended.node.as_deref())
    .bind(ended.gpu_class.as_deref())
    .bind(ended.launched_at.map(millis))
    .bind(ended.started_at.map(millis))
    .bind(millis(ended.ended_at))
    .bind(ended.cost.gpu)
    .bind(ended.cost.cpu)
    .bind(ended.cost.memory)
    .bind(ended.action.map(RetryAction::as_str))
    .bind(ended.decision.as_deref())
    .bind(changes)
    .execute(&mut **tx)
    .await?;
    Ok(())
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
        let sql = |step: &Step| update_for(step).map(|(sql, _)| sql).unwrap();
        let claim = sql(&Step::new(TaskState::Queued, TaskState::Launching));
        assert!(claim.starts_with(
            "UPDATE tasks SET state = $3, reason = $4, message = $5, exit_code = $6, \
             updated_at = $7 WHERE id = $1 AND state = $2 RETURNING "
        ));
        let mut guarded = Step::new(TaskState::Queued, TaskState::Launching);
        guarded.claimable_only = true;
        assert!(sql(&guarded).contains(
            "WHERE id = $1 AND state = $2 AND (expires_at IS NULL OR expires_at > $7) \
             AND (next_attempt_at IS NULL OR next_attempt_at <= $7) RETURNING"
        ));
        let mut judged = Step::new(TaskState::Running, TaskState::Failed);
        judged.expected_attempt = Some(3);
        let (judged_sql, values) = update_for(&judged).unwrap();
        assert!(judged_sql.contains("WHERE id = $1 AND state = $2 AND attempt = $8 RETURNING"));
        assert_eq!(values, vec![super::Value::Int(3)]);
        let running = sql(&Step::new(TaskState::Launched, TaskState::Running));
        assert!(running.contains(
            "launched_at = COALESCE(launched_at, $7), started_at = COALESCE(started_at, $7) WHERE"
        ));
        let fallback = sql(&Step::new(TaskState::Launched, TaskState::Queued)
            .attempt(2)
            .gpu_class("a100"));
        assert!(fallback.contains(
            "queued_at = $7, launched_at = NULL, started_at = NULL, attempt = $8, \
             last_heartbeat_at = NULL, last_heartbeat = NULL, gpu_class = $9 WHERE"
        ));
        let ended = sql(&Step::new(TaskState::Running, TaskState::Failed));
        assert!(ended.contains("finished_at = $7 WHERE"));
        for sql in [claim, running, fallback, ended] {
            for state in TaskState::ALL {
                assert!(!sql.contains(&format!("'{state}'")), "{sql}");
            }
        }
    }
}
