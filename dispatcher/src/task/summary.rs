//! What a list of tasks shows of each, and what the sweeps decide from: the task's progress
//! and the few spec fields a table prints or a sweep needs (name, queue, priority, image,
//! resources, timeout), without the rest of the spec (command, arguments, environment,
//! volumes, annotations), which can be a mebibyte per task.
//!
//! Invariant: every field of a [`TaskSummary`] is the value of the same field of the
//! [`Task`] it summarizes; the store reads it from columns kept beside the spec blob, so a
//! list never loads the blob.

use super::retry::RetryCount;
use super::{Reason, Resources, Spent, Task, TaskId, TaskState, Timeline};

/// A task without the heavy parts of its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSummary {
    pub id: TaskId,
    pub tenant: String,
    pub name: String,
    pub queue: String,
    pub priority: i32,
    pub image: String,
    /// What it asks of a node: what its price per hour comes from.
    pub resources: Resources,
    /// Its spec's `timeout_seconds` (0: none).
    pub timeout_seconds: u32,
    pub state: TaskState,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub attempt: u32,
    pub gpu_class: Option<String>,
    pub exit_code: Option<i32>,
    pub created_at: jiff::Timestamp,
    pub updated_at: jiff::Timestamp,
    pub timeline: Timeline,
    pub spent: Spent,
    pub expires_at: Option<jiff::Timestamp>,
    pub retries: RetryCount,
    pub next_attempt_at: Option<jiff::Timestamp>,
}

impl From<&Task> for TaskSummary {
    fn from(task: &Task) -> Self {
        Self {
            id: task.id,
            tenant: task.tenant.clone(),
            name: task.spec.name.clone(),
            queue: task.spec.queue.clone(),
            priority: task.spec.priority,
            image: task.spec.image.clone(),
            resources: task.spec.resources.clone(),
            timeout_seconds: task.spec.timeout_seconds,
            state: task.state,
            reason: task.reason,
            message: task.message.clone(),
            attempt: task.attempt,
            gpu_class: task.gpu_class.clone(),
            exit_code: task.exit_code,
            created_at: task.created_at,
            updated_at: task.updated_at,
            timeline: task.timeline,
            spent: task.spent,
            expires_at: task.expires_at,
            retries: task.retries,
            next_attempt_at: task.next_attempt_at,
        }
    }
}
