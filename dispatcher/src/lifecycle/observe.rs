//! What the lifecycle tells the world of a committed change: one log line per state
//! change, and the counters of launches, outcomes, stage latencies, cost, runner reports
//! and LLM usage. Counted where the change commits, so each counts once cluster-wide.

use protocol::Usage;

use crate::metrics::{Metrics, ReportKind, Stage};
use crate::task::{AttemptRecord, Reason, Task, TaskState};

/// Logs and counts a committed transition: launches, outcomes, stage latencies, compute
/// cost.
pub(super) fn transition(metrics: &Metrics, from: TaskState, task: &Task, now_millis: i64) {
    tracing::info!(
        task_id = %task.id,
        tenant = %task.tenant,
        queue = %task.spec.queue,
        attempt = task.attempt,
        from = %from,
        to = %task.state,
        reason = task.reason.map_or("", Reason::as_str),
        "task state changed"
    );
    let tasks = metrics.tasks();
    let queue = &task.spec.queue;
    let since = |start: Option<jiff::Timestamp>| {
        start.map(|start| (now_millis - start.as_millisecond()).max(0) as f64 / 1000.0)
    };
    let stage = |stage: Stage, seconds: Option<f64>| {
        if let Some(seconds) = seconds {
            tasks.stage(stage, queue, seconds);
        }
    };
    let launched = task.state == TaskState::Launched
        || (task.state == TaskState::Running && from == TaskState::Launching);
    if launched {
        tasks.launched(queue, task.gpu_class.as_deref());
        stage(Stage::QueuedToLaunched, since(task.timeline.queued_at));
    }
    if task.state == TaskState::Running && from == TaskState::Launched {
        stage(Stage::LaunchedToRunning, since(task.timeline.launched_at));
    }
    if task.state.is_terminal() {
        tasks.finished(queue, task.state, task.reason);
        tasks.attempts_taken(queue, task.attempt);
        stage(Stage::RunningToFinished, since(task.timeline.started_at));
        if let Some(compute) = &task.spent.compute {
            metrics.compute_cost(&task.tenant, queue, compute);
        }
    }
}

/// Counts newly stored reports by kind and the LLM usage they carry (duplicates were
/// skipped).
pub(super) fn reports(
    metrics: &Metrics,
    task: &Task,
    kinds: impl IntoIterator<Item = ReportKind>,
    usage: &[&Usage],
) {
    let reports = metrics.reports();
    for kind in kinds {
        reports.received(kind);
    }
    for usage in usage {
        reports.llm_usage(&task.tenant, &task.spec.queue, usage);
    }
}

/// Logs and counts an ended attempt: a failure with what the retry policy did.
pub(super) fn attempt_ended(metrics: &Metrics, task: &Task, ended: &AttemptRecord) {
    let (Some(class), Some(action)) = (ended.failure_class, ended.action) else {
        return;
    };
    tracing::info!(
        task_id = %task.id,
        tenant = %task.tenant,
        attempt = ended.attempt,
        failure_class = %class,
        action = action.as_str(),
        decision = ended.decision.as_deref().unwrap_or(""),
        changes = ?ended.changes,
        "attempt failed"
    );
    metrics
        .tasks()
        .attempt_failed(&task.spec.queue, class, action);
}
