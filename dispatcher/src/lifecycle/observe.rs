//! What the lifecycle tells the world of a committed change: one log line per state
//! change, and the counters of launches, outcomes, stage latencies, cost, runner reports
//! and LLM usage. Counted where the change commits, so each counts once cluster-wide.

use protocol::Usage;

use crate::metrics::{FinishedLabels, KindLabels, LaunchLabels, Metrics, ModelLabels, StageLabels, TokenLabels};
use crate::task::{Reason, Task, TaskState};

/// Counts a committed transition: launches, outcomes, stage latencies, compute cost.
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
    let families = metrics.families();
    let queue = metrics.bounded("queue", &task.spec.queue);
    let since = |start: Option<jiff::Timestamp>| {
        start.map(|start| (now_millis - start.as_millisecond()).max(0) as f64 / 1000.0)
    };
    let stage = |name: &str, seconds: Option<f64>| {
        if let Some(seconds) = seconds {
            families
                .task_stage_duration
                .get_or_create(&StageLabels {
                    stage: name.to_owned(),
                    queue: queue.clone(),
                })
                .observe(seconds);
        }
    };
    let launched = task.state == TaskState::Launched
        || (task.state == TaskState::Running && from == TaskState::Launching);
    if launched {
        families
            .tasks_launched
            .get_or_create(&LaunchLabels {
                queue: queue.clone(),
                gpu_class: task.gpu_class.clone().unwrap_or_else(|| "none".to_owned()),
            })
            .inc();
        stage("queued_to_launched", since(task.timeline.queued_at));
    }
    if task.state == TaskState::Running && from == TaskState::Launched {
        stage("launched_to_running", since(task.timeline.launched_at));
    }
    if task.state.is_terminal() {
        families
            .tasks_finished
            .get_or_create(&FinishedLabels {
                queue: queue.clone(),
                outcome: task.state.as_str().to_owned(),
                reason: task.reason.map_or("none", Reason::as_str).to_owned(),
            })
            .inc();
        stage("running_to_finished", since(task.timeline.started_at));
        if let Some(compute) = task.spent.compute {
            for (resource, dollars) in compute.by_resource() {
                metrics
                    .cost(&task.tenant, &task.spec.queue, resource, dollars);
            }
        }
    }
}

/// Counts newly stored reports and the LLM usage they carry (duplicates were skipped).
pub(super) fn reports(metrics: &Metrics, task: &Task, kinds: &[&str], usage: &[Usage]) {
    let families = metrics.families();
    for kind in kinds {
        families
            .runner_reports
            .get_or_create(&KindLabels {
                kind: (*kind).to_owned(),
            })
            .inc();
    }
    if usage.is_empty() {
        return;
    }
    let tenant = metrics.bounded("tenant", &task.tenant);
    for usage in usage {
        let model = metrics.bounded("model", &usage.model);
        families
            .llm_calls
            .get_or_create(&ModelLabels {
                tenant: tenant.clone(),
                model: model.clone(),
            })
            .inc_by(usage.calls);
        for (direction, tokens) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            families
                .llm_tokens
                .get_or_create(&TokenLabels {
                    tenant: tenant.clone(),
                    model: model.clone(),
                    direction: direction.to_owned(),
                })
                .inc_by(tokens);
        }
        metrics.cost(&task.tenant, &task.spec.queue, "llm", usage.cost_usd);
    }
}
