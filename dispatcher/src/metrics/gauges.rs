//! The state gauges: what the store holds, read at scrape time by [`super::snapshot`] and
//! the same on every replica (take `max` over replicas). Tasks by state, queue depth and
//! age, stuck tasks, tasks held by a tenant quota, GPUs and their use per class, the
//! running cost rate, tenant spend against budgets, and the age of the snapshot behind
//! them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::FloatGauge;
use super::labels::BudgetPeriod;
use super::registry::Registrar;
use crate::task::TaskState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StateLabels {
    pub(super) state: TaskState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct QueueLabels {
    pub(super) queue: String,
}

/// `reason` is one of the store's fixed words (`queued_too_long`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StuckLabels {
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct GpuClassLabels {
    pub(super) gpu_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TenantQueueLabels {
    pub(super) tenant: String,
    pub(super) queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TenantLabels {
    pub(super) tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BudgetLabels {
    pub(super) tenant: String,
    pub(super) period: BudgetPeriod,
}

/// The families [`super::snapshot`] clears and refills.
#[derive(Debug)]
pub(super) struct StateGauges {
    pub(super) tasks: Family<StateLabels, Gauge>,
    pub(super) queue_depth: Family<QueueLabels, Gauge>,
    pub(super) queue_oldest_age: Family<QueueLabels, FloatGauge>,
    pub(super) stuck_tasks: Family<StuckLabels, Gauge>,
    pub(super) gpus_allocated: Family<GpuClassLabels, Gauge>,
    pub(super) gpus_reporting: Family<GpuClassLabels, Gauge>,
    pub(super) gpu_utilization: Family<GpuClassLabels, FloatGauge>,
    pub(super) gpu_memory_used: Family<GpuClassLabels, FloatGauge>,
    pub(super) cost_rate: Family<TenantQueueLabels, FloatGauge>,
    pub(super) tenant_spend: Family<BudgetLabels, FloatGauge>,
    pub(super) tenant_budget: Family<BudgetLabels, FloatGauge>,
    pub(super) waiting_on_quota: Family<TenantLabels, Gauge>,
    pub(super) cost_rate_alert_threshold: FloatGauge,
    pub(super) snapshot_age: FloatGauge,
}

impl StateGauges {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let g = Self {
            tasks: Family::default(),
            queue_depth: Family::default(),
            queue_oldest_age: Family::default(),
            stuck_tasks: Family::default(),
            gpus_allocated: Family::default(),
            gpus_reporting: Family::default(),
            gpu_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            cost_rate: Family::default(),
            tenant_spend: Family::default(),
            tenant_budget: Family::default(),
            waiting_on_quota: Family::default(),
            cost_rate_alert_threshold: FloatGauge::default(),
            snapshot_age: FloatGauge::default(),
        };
        registrar.gauge(
            "tasks",
            &["state"],
            "Tasks in the store, by state (read from the store at scrape time)",
            g.tasks.clone(),
        );
        registrar.gauge(
            "queue_depth",
            &["queue"],
            "Queued tasks, by queue (from the store)",
            g.queue_depth.clone(),
        );
        registrar.gauge(
            "queue_oldest_age_seconds",
            &["queue"],
            "Age of the longest-waiting queued task, by queue (from the store; absent for an empty queue)",
            g.queue_oldest_age.clone(),
        );
        registrar.gauge(
            "stuck_tasks",
            &["reason"],
            "Tasks not progressing, by reason: queued_too_long, launching_stale, unschedulable, heartbeat_lost",
            g.stuck_tasks.clone(),
        );
        registrar.gauge(
            "gpus_allocated",
            &["gpu_class"],
            "GPUs held by launched and running tasks, by GPU class",
            g.gpus_allocated.clone(),
        );
        registrar.gauge(
            "gpus_reporting",
            &["gpu_class"],
            "GPUs whose runner reported a sample in the last heartbeat, by GPU class",
            g.gpus_reporting.clone(),
        );
        registrar.gauge(
            "gpu_utilization_ratio",
            &["gpu_class"],
            "Mean utilisation (0-1) of the GPUs in gpus_reporting, by GPU class",
            g.gpu_utilization.clone(),
        );
        registrar.gauge(
            "gpu_memory_used_bytes",
            &["gpu_class"],
            "GPU memory in use on the GPUs in gpus_reporting, by GPU class",
            g.gpu_memory_used.clone(),
        );
        registrar.gauge(
            "cost_rate_dollars_per_hour",
            &["tenant", "queue"],
            "What the running tasks cost per hour (GPU, CPU and memory prices), by tenant and queue",
            g.cost_rate.clone(),
        );
        registrar.gauge(
            "tenant_spend_dollars",
            &["tenant", "period"],
            "A tenant's spend in the current UTC day or month, by tenant and period (day, month)",
            g.tenant_spend.clone(),
        );
        registrar.gauge(
            "tenant_budget_dollars",
            &["tenant", "period"],
            "A tenant's configured budget, by tenant and period (day, month); absent without one",
            g.tenant_budget.clone(),
        );
        registrar.gauge(
            "tasks_waiting_on_quota",
            &["tenant"],
            "Queued tasks held by their tenant's quota on running work (reason tenant_quota), by tenant",
            g.waiting_on_quota.clone(),
        );
        registrar.gauge(
            "cost_rate_alert_threshold_dollars_per_hour",
            &[],
            "The configured cost rate above which AgentBusHighCostRate fires (--cost-rate-alert-dollars-per-hour)",
            g.cost_rate_alert_threshold.clone(),
        );
        registrar.gauge(
            "store_snapshot_age_seconds",
            &[],
            "Age of the store snapshot behind the state gauges",
            g.snapshot_age.clone(),
        );
        g
    }
}
