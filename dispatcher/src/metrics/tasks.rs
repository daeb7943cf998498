//! The task lifecycle as this process sees it: submissions (accepted, replayed, refused
//! over budget), launches and their failures, launches in flight, final states, and the
//! time spent in each stage.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::Metrics;
use super::errors::ErrorComponent;
use super::labels::{BudgetPeriod, ReasonOrNone, label_values};
use super::registry::{Registrar, stage_histogram};
use crate::cost::Period;
use crate::task::retry::{FailureClass, RetryAction};
use crate::task::{Reason, TaskState};

label_values! {
    /// A stage of a task's life, timed from its start to its end.
    pub enum Stage {
        QueuedToLaunched => "queued_to_launched",
        LaunchedToRunning => "launched_to_running",
        RunningToFinished => "running_to_finished",
    }
}

label_values! {
    /// How a launch attempt failed.
    pub enum LaunchFailure {
        /// Retried by the reconciler.
        Transient => "transient",
        /// The task failed.
        Permanent => "permanent",
        /// The namespace's ResourceQuota had no room; the task waits and is retried.
        ClusterQuota => "cluster_quota",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantQueueLabels {
    tenant: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    tenant: String,
    period: BudgetPeriod,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaunchLabels {
    queue: String,
    gpu_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaunchFailureLabels {
    queue: String,
    kind: LaunchFailure,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    queue: String,
    outcome: TaskState,
    reason: ReasonOrNone,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: Stage,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptFailureLabels {
    queue: String,
    failure_class: FailureClass,
    action: RetryAction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

/// Attempts per finished task: 1 to 20 and beyond.
const ATTEMPT_BUCKETS: [f64; 9] = [1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, 20.0];

fn attempts_histogram() -> Histogram {
    Histogram::new(ATTEMPT_BUCKETS)
}

#[derive(Debug)]
pub(super) struct TaskFamilies {
    attempt_failures: Family<AttemptFailureLabels, Counter>,
    attempts: Family<QueueLabels, Histogram>,
    submitted: Family<TenantQueueLabels, Counter>,
    idempotency_key_hits: Family<TenantLabels, Counter>,
    budget_refusals: Family<BudgetLabels, Counter>,
    launched: Family<LaunchLabels, Counter>,
    launch_failures: Family<LaunchFailureLabels, Counter>,
    finished: Family<FinishedLabels, Counter>,
    stage_duration: Family<StageLabels, Histogram>,
    launches_in_flight: Gauge,
}

impl TaskFamilies {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let f = Self {
            attempt_failures: Family::default(),
            attempts: Family::new_with_constructor(attempts_histogram),
            submitted: Family::default(),
            idempotency_key_hits: Family::default(),
            budget_refusals: Family::default(),
            launched: Family::default(),
            launch_failures: Family::default(),
            finished: Family::default(),
            stage_duration: Family::new_with_constructor(stage_histogram),
            launches_in_flight: Gauge::default(),
        };
        registrar.counter(
            "tasks_submitted",
            &["tenant", "queue"],
            "Tasks accepted by POST /v1/tasks (idempotent replays excluded), by tenant and queue",
            f.submitted.clone(),
        );
        registrar.counter(
            "idempotency_key_hits",
            &["tenant"],
            "Submissions answered with an existing task because their idempotency key was known",
            f.idempotency_key_hits.clone(),
        );
        registrar.counter(
            "budget_refusals",
            &["tenant", "period"],
            "Submissions refused with 402 because a tenant budget was spent, by tenant and period",
            f.budget_refusals.clone(),
        );
        registrar.counter(
            "tasks_launched",
            &["queue", "gpu_class"],
            "Tasks whose Job (or process) was created, by queue and GPU class (`none` without GPUs)",
            f.launched.clone(),
        );
        registrar.counter(
            "launch_failures",
            &["queue", "kind"],
            "Launch attempts that failed, by queue and kind (`transient`: retried, `permanent`: task failed, `cluster_quota`: no room in the namespace's ResourceQuota, the task waits)",
            f.launch_failures.clone(),
        );
        registrar.counter(
            "tasks_finished",
            &["queue", "outcome", "reason"],
            "Tasks that reached a final state, by queue, outcome (the final state) and reason (`none` if unset)",
            f.finished.clone(),
        );
        registrar.histogram(
            "task_stage_duration_seconds",
            &["stage", "queue"],
            "Time tasks spent in each stage: queued_to_launched, launched_to_running, running_to_finished",
            f.stage_duration.clone(),
        );
        registrar.counter(
            "attempt_failures",
            &["queue", "failure_class", "action"],
            "Failed task attempts by queue, failure class and what the retry policy did (`retry`: a counted retry, `ignore`: a free retry, `fail`: the task failed)",
            f.attempt_failures.clone(),
        );
        registrar.histogram(
            "task_attempts",
            &["queue"],
            "Attempts each task took until its final state, by queue",
            f.attempts.clone(),
        );
        registrar.gauge(
            "launches_in_flight",
            &[],
            "Launches this process has started and not finished",
            f.launches_in_flight.clone(),
        );
        f
    }
}

/// Records the task lifecycle. Tenant and queue names are bounded here.
#[derive(Debug, Clone, Copy)]
pub struct TaskMetrics<'a> {
    pub(super) metrics: &'a Metrics,
}

impl TaskMetrics<'_> {
    fn families(&self) -> &TaskFamilies {
        &self.metrics.inner.tasks
    }

    fn tenant(self, tenant: &str) -> String {
        self.metrics.bounded("tenant", tenant)
    }

    fn queue(self, queue: &str) -> String {
        self.metrics.bounded("queue", queue)
    }

    /// A task accepted by `POST /v1/tasks` (not a replay).
    pub fn submitted(&self, tenant: &str, queue: &str) {
        self.families()
            .submitted
            .get_or_create(&TenantQueueLabels {
                tenant: self.tenant(tenant),
                queue: self.queue(queue),
            })
            .inc();
    }

    /// A submission answered with the existing task of its idempotency key.
    pub fn idempotent_replay(&self, tenant: &str) {
        self.families()
            .idempotency_key_hits
            .get_or_create(&TenantLabels {
                tenant: self.tenant(tenant),
            })
            .inc();
    }

    /// A submission refused because the tenant's budget for `period` is spent.
    pub fn refused_over_budget(&self, tenant: &str, period: Period) {
        self.families()
            .budget_refusals
            .get_or_create(&BudgetLabels {
                tenant: self.tenant(tenant),
                period: period.into(),
            })
            .inc();
    }

    /// A task whose Job (or process) was created; `gpu_class` is `None` without GPUs.
    pub fn launched(&self, queue: &str, gpu_class: Option<&str>) {
        self.families()
            .launched
            .get_or_create(&LaunchLabels {
                queue: self.queue(queue),
                gpu_class: gpu_class.unwrap_or("none").to_owned(),
            })
            .inc();
    }

    /// A launch attempt that failed; also an error of the launcher.
    pub fn launch_failed(&self, queue: &str, failure: LaunchFailure) {
        self.families()
            .launch_failures
            .get_or_create(&LaunchFailureLabels {
                queue: self.queue(queue),
                kind: failure,
            })
            .inc();
        self.metrics
            .error(ErrorComponent::Launcher, failure.as_str());
    }

    /// Counts a launch in flight until the returned guard is dropped.
    #[must_use = "the launch counts as in flight until the guard is dropped"]
    pub fn launch_in_flight(&self) -> LaunchInFlight {
        let gauge = self.families().launches_in_flight.clone();
        gauge.inc();
        LaunchInFlight { gauge }
    }

    /// A task that reached its final `state`.
    pub fn finished(&self, queue: &str, state: TaskState, reason: Option<Reason>) {
        self.families()
            .finished
            .get_or_create(&FinishedLabels {
                queue: self.queue(queue),
                outcome: state,
                reason: ReasonOrNone(reason),
            })
            .inc();
    }

    /// An attempt failed with `class` and the retry policy chose `action`.
    pub fn attempt_failed(&self, queue: &str, class: FailureClass, action: RetryAction) {
        self.families()
            .attempt_failures
            .get_or_create(&AttemptFailureLabels {
                queue: self.queue(queue),
                failure_class: class,
                action,
            })
            .inc();
    }

    /// A task reached its final state at attempt `attempts`.
    pub fn attempts_taken(&self, queue: &str, attempts: u32) {
        self.families()
            .attempts
            .get_or_create(&QueueLabels {
                queue: self.queue(queue),
            })
            .observe(f64::from(attempts));
    }

    /// A task spent `seconds` in `stage`.
    pub fn stage(&self, stage: Stage, queue: &str, seconds: f64) {
        self.families()
            .stage_duration
            .get_or_create(&StageLabels {
                stage,
                queue: self.queue(queue),
            })
            .observe(seconds);
    }
}

/// One launch in flight, counted until dropped.
#[derive(Debug)]
pub struct LaunchInFlight {
    gauge: Gauge,
}

impl Drop for LaunchInFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
