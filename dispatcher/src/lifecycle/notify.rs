//! What a webhook delivery says: the Standard Webhooks payload
//! `{"type": "task.succeeded", "timestamp": RFC 3339, "data": <the task as the API shows
//! it>}`, made once, when the state change that causes it is committed (the store writes
//! it in that transaction), so every attempt sends the same bytes.
//!
//! The task's view is the API's (`TaskView`), but the lifecycle must not depend on the
//! API: whoever wires the process hands a [`TaskRenderer`] in
//! ([`super::Lifecycle::with_task_renderer`]); without one the data is a summary of the
//! task (id, tenant, state, reason, message, attempt, exit code).

use std::sync::Arc;

use serde_json::{Value, json};

use crate::task::Task;

/// Turns a task into the JSON its webhook deliveries carry as `data`.
#[derive(Clone)]
pub struct TaskRenderer(Arc<dyn Fn(&Task) -> Value + Send + Sync>);

impl std::fmt::Debug for TaskRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskRenderer")
    }
}

impl TaskRenderer {
    #[must_use]
    pub fn new(render: impl Fn(&Task) -> Value + Send + Sync + 'static) -> Self {
        Self(Arc::new(render))
    }

    #[must_use]
    pub fn render(&self, task: &Task) -> Value {
        (self.0)(task)
    }
}

impl Default for TaskRenderer {
    /// A summary of the task, for processes that do not serve the API's view.
    fn default() -> Self {
        Self::new(|task| {
            json!({
                "id": task.id.to_string(),
                "tenant": task.tenant,
                "state": task.state,
                "reason": task.reason,
                "message": task.message,
                "attempt": task.attempt,
                "exit_code": task.exit_code,
            })
        })
    }
}

/// The body of a delivery of `event_type` about `task` at `at`.
#[must_use]
pub(super) fn body(
    renderer: &TaskRenderer,
    task: &Task,
    event_type: &str,
    at: jiff::Timestamp,
) -> String {
    json!({
        "type": event_type,
        "timestamp": at.to_string(),
        "data": renderer.render(task),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::{TaskRenderer, body};
    use crate::task::fixtures::TaskFixture;

    #[test]
    fn the_body_is_the_standard_webhooks_envelope() {
        let task = TaskFixture::new().obj();
        let at: jiff::Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
        let text = body(&TaskRenderer::default(), &task, "task.succeeded", at);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["type"], "task.succeeded");
        assert_eq!(value["timestamp"], "2026-12-02T10:00:00Z");
        assert_eq!(value["data"]["id"], task.id.to_string());
        assert_eq!(value["data"]["state"], "queued");
    }
}
