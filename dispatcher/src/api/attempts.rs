//! The attempt list of `GET /v1/tasks/{id}`: every ended attempt of a task (how it ended,
//! where it ran, what it cost, what the retry policy made of it), then the attempt in
//! progress.

use serde::Serialize;

use crate::cost::round_cents;
use crate::task::retry::{FailureClass, RetryAction};
use crate::task::{AttemptOutcome, AttemptRecord, Reason, Task, TaskState};

/// One attempt of a task.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    /// 1 for the first run.
    pub attempt: u32,
    /// How it ended; absent while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AttemptOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Why it failed (see docs/LIFECYCLE.md for the classes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_class: Option<FailureClass>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The node it ran on, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_class: Option<String>,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Its compute cost in dollars (settled once it ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_dollars: Option<f64>,
    /// What the retry policy did after it failed: `retry`, `ignore` (a free retry) or
    /// `fail`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<RetryAction>,
    /// Why: the rule that decided and the backoff, or why no retry followed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// What the next attempt changed, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
}

impl From<AttemptRecord> for AttemptView {
    fn from(record: AttemptRecord) -> Self {
        Self {
            attempt: record.attempt,
            outcome: Some(record.outcome),
            reason: record.reason,
            failure_class: record.failure_class,
            exit_code: record.exit_code,
            message: record.message,
            node: record.node,
            gpu_class: record.gpu_class,
            launched_at: record.launched_at.map(|t| t.to_string()),
            started_at: record.started_at.map(|t| t.to_string()),
            ended_at: Some(record.ended_at.to_string()),
            cost_dollars: Some(round_cents(record.cost.total())),
            action: record.action,
            decision: record.decision,
            changes: record.changes,
        }
    }
}

/// The attempts of `task`: the ended ones, then the one in progress (launched, not yet
/// ended; a task waiting in the queue has none in progress).
#[must_use]
pub fn attempts_of(task: &Task, ended: Vec<AttemptRecord>) -> Vec<AttemptView> {
    let in_progress = matches!(
        task.state,
        TaskState::Launching | TaskState::Launched | TaskState::Running
    ) && ended.iter().all(|record| record.attempt != task.attempt);
    let mut views: Vec<AttemptView> = ended.into_iter().map(AttemptView::from).collect();
    if in_progress {
        views.push(AttemptView {
            attempt: task.attempt,
            outcome: None,
            reason: None,
            failure_class: None,
            exit_code: None,
            message: None,
            node: None,
            gpu_class: task.gpu_class.clone(),
            launched_at: task.timeline.launched_at.map(|t| t.to_string()),
            started_at: task.timeline.started_at.map(|t| t.to_string()),
            ended_at: None,
            cost_dollars: None,
            action: None,
            decision: None,
            changes: Vec::new(),
        });
    }
    views
}
