//! Decoding stored rows into domain values. A row that does not decode is
//! [`StoreError::Corrupt`], naming the record, never a panic.

use std::str::FromStr;

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Result, StoreError, TaskEvent, Tenant};
use crate::cost::{Breakdown, Budget};
use crate::task::retry::{FailureClass, RetryAction, RetryCount};
use crate::task::{
    AttemptRecord, Reason, Resources, Spent, Task, TaskId, TaskSpec, TaskState, TaskSummary,
    Timeline,
};

/// The columns [`task`] reads, in `SELECT` order; a macro so queries stay `&'static str`.
macro_rules! task_columns {
    () => {
        "id, tenant, spec, state, reason, message, attempt, gpu_class, exit_code, created_at, \
         updated_at, queued_at, launched_at, started_at, finished_at, gpu_cost_dollars, \
         cpu_cost_dollars, memory_cost_dollars, llm_cost_dollars, expires_at, retries_used, \
         ignored_attempts, next_attempt_at, avoid_nodes, earlier_gpu_cost_dollars, \
         earlier_cpu_cost_dollars, earlier_memory_cost_dollars"
    };
}
pub(super) use task_columns;

/// The columns [`task_summary`] reads: [`task_columns!`] without the spec blob, with the
/// spec fields kept beside it (`name`, `queue`, `priority`, `image`, `resources`,
/// `timeout_seconds`).
macro_rules! summary_columns {
    () => {
        "id, tenant, name, queue, priority, image, resources, timeout_seconds, state, reason, message, attempt, \
         gpu_class, exit_code, created_at, updated_at, queued_at, launched_at, started_at, \
         finished_at, gpu_cost_dollars, cpu_cost_dollars, memory_cost_dollars, \
         llm_cost_dollars, expires_at, retries_used, ignored_attempts, next_attempt_at, \
         earlier_gpu_cost_dollars, earlier_cpu_cost_dollars, earlier_memory_cost_dollars"
    };
}
pub(super) use summary_columns;

/// The columns [`event`] reads.
macro_rules! event_columns {
    () => {
        "id, task_id, attempt, from_state, to_state, reason, message, exit_code, at"
    };
}
pub(super) use event_columns;

/// The columns [`attempt_record`] reads.
macro_rules! attempt_columns {
    () => {
        "attempt, outcome, reason, failure_class, exit_code, message, node, gpu_class, \
         launched_at, started_at, ended_at, gpu_cost_dollars, cpu_cost_dollars, \
         memory_cost_dollars, action, decision, changes"
    };
}
pub(super) use attempt_columns;

/// The columns [`tenant`] reads.
macro_rules! tenant_columns {
    () => {
        "name, max_queued_tasks, created_at, daily_budget_dollars, monthly_budget_dollars, \
         budget_action, default_queue_ttl_seconds, disabled_at"
    };
}
pub(super) use tenant_columns;

/// Unix milliseconds, the stored form of every time.
pub(super) fn millis(time: jiff::Timestamp) -> i64 {
    time.as_millisecond()
}

pub(super) fn timestamp(millis: i64, record: &dyn Fn() -> String) -> Result<jiff::Timestamp> {
    jiff::Timestamp::from_millisecond(millis)
        .map_err(|e| StoreError::corrupt(record(), e.to_string()))
}

pub(super) fn get<'r, T>(row: &'r AnyRow, column: &str, record: &dyn Fn() -> String) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(column)
        .map_err(|e| StoreError::corrupt(record(), format!("column {column}: {e}")))
}

pub(super) fn parse<T>(text: &str, column: &str, record: &dyn Fn() -> String) -> Result<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    text.parse()
        .map_err(|e| StoreError::corrupt(record(), format!("column {column}: {e}")))
}

fn parse_optional<T>(
    text: Option<String>,
    column: &str,
    record: &dyn Fn() -> String,
) -> Result<Option<T>>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    text.map(|text| parse(&text, column, record)).transpose()
}

fn attempt(value: i32, record: &dyn Fn() -> String) -> Result<u32> {
    u32::try_from(value).map_err(|e| StoreError::corrupt(record(), format!("column attempt: {e}")))
}

/// A row of [`task_columns!`].
pub(super) fn task(row: &AnyRow) -> Result<Task> {
    let id_text: String = get(row, "id", &|| "task".to_owned())?;
    let record = || format!("task {id_text}");
    let spec: String = get(row, "spec", &record)?;
    let spec: TaskSpec = serde_json::from_str(&spec)
        .map_err(|e| StoreError::corrupt(record(), format!("column spec: {e}")))?;
    let progress = progress(row, &record)?;
    Ok(Task {
        id: parse::<TaskId>(&id_text, "id", &record)?,
        tenant: get(row, "tenant", &record)?,
        spec,
        state: progress.state,
        reason: progress.reason,
        message: progress.message,
        attempt: progress.attempt,
        gpu_class: progress.gpu_class,
        exit_code: progress.exit_code,
        created_at: progress.created_at,
        updated_at: progress.updated_at,
        timeline: progress.timeline,
        spent: progress.spent,
        expires_at: progress.expires_at,
        retries: progress.retries,
        next_attempt_at: progress.next_attempt_at,
        avoid_nodes: match get::<Option<String>>(row, "avoid_nodes", &record)? {
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| StoreError::corrupt(record(), format!("column avoid_nodes: {e}")))?,
            None => Vec::new(),
        },
    })
}

/// A row of [`summary_columns!`].
pub(super) fn task_summary(row: &AnyRow) -> Result<TaskSummary> {
    let id_text: String = get(row, "id", &|| "task".to_owned())?;
    let record = || format!("task {id_text}");
    let resources: String = get(row, "resources", &record)?;
    let resources: Resources = serde_json::from_str(&resources)
        .map_err(|e| StoreError::corrupt(record(), format!("column resources: {e}")))?;
    let progress = progress(row, &record)?;
    Ok(TaskSummary {
        id: parse::<TaskId>(&id_text, "id", &record)?,
        tenant: get(row, "tenant", &record)?,
        name: get(row, "name", &record)?,
        queue: get(row, "queue", &record)?,
        priority: get(row, "priority", &record)?,
        image: get(row, "image", &record)?,
        resources,
        timeout_seconds: {
            let seconds: i64 = get(row, "timeout_seconds", &record)?;
            u32::try_from(seconds).map_err(|_| {
                StoreError::corrupt(record(), format!("column timeout_seconds: {seconds}"))
            })?
        },
        state: progress.state,
        reason: progress.reason,
        message: progress.message,
        attempt: progress.attempt,
        gpu_class: progress.gpu_class,
        exit_code: progress.exit_code,
        created_at: progress.created_at,
        updated_at: progress.updated_at,
        timeline: progress.timeline,
        spent: progress.spent,
        expires_at: progress.expires_at,
        retries: progress.retries,
        next_attempt_at: progress.next_attempt_at,
    })
}

/// What a task row says of the task's progress, read the same for a task and a summary.
struct Progress {
    state: TaskState,
    reason: Option<Reason>,
    message: Option<String>,
    attempt: u32,
    gpu_class: Option<String>,
    exit_code: Option<i32>,
    created_at: jiff::Timestamp,
    updated_at: jiff::Timestamp,
    timeline: Timeline,
    spent: Spent,
    expires_at: Option<jiff::Timestamp>,
    retries: RetryCount,
    next_attempt_at: Option<jiff::Timestamp>,
}

fn progress(row: &AnyRow, record: &dyn Fn() -> String) -> Result<Progress> {
    Ok(Progress {
        state: parse(&get::<String>(row, "state", record)?, "state", record)?,
        reason: parse_optional::<Reason>(get(row, "reason", record)?, "reason", record)?,
        message: get(row, "message", record)?,
        attempt: attempt(get(row, "attempt", record)?, record)?,
        gpu_class: get(row, "gpu_class", record)?,
        exit_code: get(row, "exit_code", record)?,
        created_at: timestamp(get(row, "created_at", record)?, record)?,
        updated_at: timestamp(get(row, "updated_at", record)?, record)?,
        timeline: Timeline {
            queued_at: optional_timestamp(get(row, "queued_at", record)?, record)?,
            launched_at: optional_timestamp(get(row, "launched_at", record)?, record)?,
            started_at: optional_timestamp(get(row, "started_at", record)?, record)?,
            finished_at: optional_timestamp(get(row, "finished_at", record)?, record)?,
        },
        spent: Spent {
            compute: match (
                get::<Option<f64>>(row, "gpu_cost_dollars", record)?,
                get::<Option<f64>>(row, "cpu_cost_dollars", record)?,
                get::<Option<f64>>(row, "memory_cost_dollars", record)?,
            ) {
                (Some(gpu), Some(cpu), Some(memory)) => Some(Breakdown { gpu, cpu, memory }),
                _ => None,
            },
            llm_dollars: get(row, "llm_cost_dollars", record)?,
            earlier_attempts: Breakdown {
                gpu: get(row, "earlier_gpu_cost_dollars", record)?,
                cpu: get(row, "earlier_cpu_cost_dollars", record)?,
                memory: get(row, "earlier_memory_cost_dollars", record)?,
            },
        },
        expires_at: optional_timestamp(get(row, "expires_at", record)?, record)?,
        retries: RetryCount {
            counted: count(get(row, "retries_used", record)?, "retries_used", record)?,
            ignored: count(
                get(row, "ignored_attempts", record)?,
                "ignored_attempts",
                record,
            )?,
        },
        next_attempt_at: optional_timestamp(get(row, "next_attempt_at", record)?, record)?,
    })
}

fn count(value: i32, column: &str, record: &dyn Fn() -> String) -> Result<u32> {
    u32::try_from(value).map_err(|e| StoreError::corrupt(record(), format!("column {column}: {e}")))
}

/// A row of [`attempt_columns!`] of task `task_id`.
pub(super) fn attempt_record(row: &AnyRow, task_id: TaskId) -> Result<AttemptRecord> {
    let number: i32 = get(row, "attempt", &|| format!("an attempt of task {task_id}"))?;
    let record = || format!("attempt {number} of task {task_id}");
    let changes: String = get(row, "changes", &record)?;
    Ok(AttemptRecord {
        attempt: attempt(number, &record)?,
        outcome: parse(&get::<String>(row, "outcome", &record)?, "outcome", &record)?,
        reason: parse_optional(get(row, "reason", &record)?, "reason", &record)?,
        failure_class: parse_optional::<FailureClass>(
            get(row, "failure_class", &record)?,
            "failure_class",
            &record,
        )?,
        exit_code: get(row, "exit_code", &record)?,
        message: get(row, "message", &record)?,
        node: get(row, "node", &record)?,
        gpu_class: get(row, "gpu_class", &record)?,
        launched_at: optional_timestamp(get(row, "launched_at", &record)?, &record)?,
        started_at: optional_timestamp(get(row, "started_at", &record)?, &record)?,
        ended_at: timestamp(get(row, "ended_at", &record)?, &record)?,
        cost: Breakdown {
            gpu: get(row, "gpu_cost_dollars", &record)?,
            cpu: get(row, "cpu_cost_dollars", &record)?,
            memory: get(row, "memory_cost_dollars", &record)?,
        },
        action: parse_optional::<RetryAction>(get(row, "action", &record)?, "action", &record)?,
        decision: get(row, "decision", &record)?,
        changes: serde_json::from_str(&changes)
            .map_err(|e| StoreError::corrupt(record(), format!("column changes: {e}")))?,
    })
}

fn optional_timestamp(
    millis: Option<i64>,
    record: &dyn Fn() -> String,
) -> Result<Option<jiff::Timestamp>> {
    millis.map(|millis| timestamp(millis, record)).transpose()
}

/// A row of [`event_columns!`].
pub(super) fn event(row: &AnyRow) -> Result<TaskEvent> {
    let id: i64 = get(row, "id", &|| "task event".to_owned())?;
    let record = || format!("task event {id}");
    Ok(TaskEvent {
        id,
        task_id: parse(&get::<String>(row, "task_id", &record)?, "task_id", &record)?,
        attempt: attempt(get(row, "attempt", &record)?, &record)?,
        from: parse_optional::<TaskState>(get(row, "from_state", &record)?, "from_state", &record)?,
        to: parse(
            &get::<String>(row, "to_state", &record)?,
            "to_state",
            &record,
        )?,
        reason: parse_optional::<Reason>(get(row, "reason", &record)?, "reason", &record)?,
        message: get(row, "message", &record)?,
        exit_code: get(row, "exit_code", &record)?,
        at: timestamp(get(row, "at", &record)?, &record)?,
    })
}

/// A row of [`tenant_columns!`].
pub(super) fn tenant(row: &AnyRow) -> Result<Tenant> {
    let name: String = get(row, "name", &|| "tenant".to_owned())?;
    let record = || format!("tenant '{name}'");
    let limit: i64 = get(row, "max_queued_tasks", &record)?;
    Ok(Tenant {
        max_queued_tasks: u32::try_from(limit)
            .map_err(|e| StoreError::corrupt(record(), format!("column max_queued_tasks: {e}")))?,
        created_at: timestamp(get(row, "created_at", &record)?, &record)?,
        default_queue_ttl_seconds: get::<Option<i64>>(row, "default_queue_ttl_seconds", &record)?
            .map(|seconds| {
                u32::try_from(seconds).map_err(|e| {
                    StoreError::corrupt(record(), format!("column default_queue_ttl_seconds: {e}"))
                })
            })
            .transpose()?,
        disabled_at: get::<Option<i64>>(row, "disabled_at", &record)?
            .map(|at| timestamp(at, &record))
            .transpose()?,
        budget: Budget {
            daily_dollars: get(row, "daily_budget_dollars", &record)?,
            monthly_dollars: get(row, "monthly_budget_dollars", &record)?,
            action: parse(
                &get::<String>(row, "budget_action", &record)?,
                "budget_action",
                &record,
            )?,
        },
        name,
    })
}
