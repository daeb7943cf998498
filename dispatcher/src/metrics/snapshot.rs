//! The state gauges, read from the store at scrape time (at most once per
//! [`SnapshotConfig::max_age`], however many scrapers ask): tasks by state, queue depth and
//! age, stuck tasks, tasks held by a tenant quota, GPUs and their use per class, the
//! running cost rate, tenant spend against budgets (the families of [`super::gauges`]),
//! and the pool. (This process's own figures are read at each scrape by
//! [`super::process`].)
//!
//! Every family here is cleared and refilled on each refresh, so a queue that emptied or a
//! class no longer in use disappears instead of keeping its last value.

use std::collections::BTreeMap;
use std::time::Duration;

use super::gauges::{
    BudgetLabels, GpuClassLabels, QueueLabels, StateLabels, StuckLabels, TenantLabels,
    TenantQueueLabels,
};
use super::{ErrorComponent, Metrics, PoolState};
use crate::cost::{Period, Prices};
use crate::store::Store;
use crate::task::TaskState;

/// What the snapshot needs beyond the store.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// A refresh younger than this is served as is.
    pub max_age: Duration,
    /// Queued longer than this counts as stuck (`queued_too_long`).
    pub queued_too_long: Duration,
    /// Launching longer than this counts as stuck (`launching_stale`).
    pub launching_stale: Duration,
    /// Exported for the high-cost alert; 0 disables it.
    pub cost_rate_alert_dollars_per_hour: f64,
}

impl SnapshotConfig {
    /// The default of `max_age` (and of `--metrics-snapshot-seconds`).
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(5);
    /// The default of `queued_too_long` (and of `--queued-too-long-after`).
    pub const DEFAULT_QUEUED_TOO_LONG: Duration = Duration::from_mins(10);
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            max_age: Self::DEFAULT_MAX_AGE,
            queued_too_long: Self::DEFAULT_QUEUED_TOO_LONG,
            launching_stale: Duration::from_mins(2),
            cost_rate_alert_dollars_per_hour: 0.0,
        }
    }
}

/// Refreshes the state gauges unless a refresh younger than `config.max_age` exists.
pub async fn refresh(metrics: &Metrics, store: &Store, prices: &Prices, config: &SnapshotConfig) {
    metrics
        .inner
        .gauges
        .cost_rate_alert_threshold
        .set(config.cost_rate_alert_dollars_per_hour);
    let (in_use, idle, max) = store.pool_figures();
    for (state, connections) in [
        (PoolState::InUse, in_use),
        (PoolState::Idle, idle),
        (PoolState::Max, max),
    ] {
        metrics.store_pool_connections(state, connections);
    }
    metrics
        .refresh_snapshot(config.max_age, || async {
            match read(metrics, store, prices, config).await {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(error = %error, "reading the store for the metrics snapshot failed");
                    metrics.error(ErrorComponent::Store, "snapshot");
                    false
                }
            }
        })
        .await;
}

async fn read(
    metrics: &Metrics,
    store: &Store,
    prices: &Prices,
    config: &SnapshotConfig,
) -> Result<(), crate::store::StoreError> {
    let now = jiff::Timestamp::now();
    let ago = |d: Duration| {
        now.checked_sub(jiff::SignedDuration::try_from(d).unwrap_or_default())
            .unwrap_or(now)
    };
    let by_state = store.count_by_state().await?;
    let queues = store.queue_figures().await?;
    let stuck = store
        .stuck_counts(ago(config.queued_too_long), ago(config.launching_stale))
        .await?;
    let active = store.active_tasks().await?;
    let budgets = store.budgets().await?;
    let held = store.waiting_on_quota().await?;
    let mut spend = Vec::new();
    for (tenant, budget) in &budgets {
        let parts = store.spend_parts(tenant, now).await?;
        spend.push((tenant.clone(), *budget, prices.spend(&parts, now)));
    }

    let f = &metrics.inner.gauges;
    f.tasks.clear();
    for (state, count) in by_state {
        f.tasks.get_or_create(&StateLabels { state }).set(count);
    }
    f.queue_depth.clear();
    f.queue_oldest_age.clear();
    for queue in queues {
        let labels = QueueLabels {
            queue: metrics.bounded("queue", &queue.queue),
        };
        f.queue_depth.get_or_create(&labels).set(queue.depth);
        if let Some(oldest) = queue.oldest_queued_at {
            let age = (now.as_millisecond() - oldest.as_millisecond()).max(0) as f64 / 1000.0;
            f.queue_oldest_age.get_or_create(&labels).set(age);
        }
    }
    f.waiting_on_quota.clear();
    for (tenant, count) in held {
        let labels = TenantLabels {
            tenant: metrics.bounded("tenant", &tenant),
        };
        // Tenants beyond the label bound share one series: add, not set.
        f.waiting_on_quota.get_or_create(&labels).inc_by(count);
    }
    f.stuck_tasks.clear();
    for (reason, count) in stuck {
        f.stuck_tasks
            .get_or_create(&StuckLabels { reason })
            .set(count);
    }

    let mut classes: BTreeMap<String, ClassFigures> = BTreeMap::new();
    let mut rates: BTreeMap<(String, String), f64> = BTreeMap::new();
    for active in &active {
        let task = &active.task;
        if let (Some(gpu), Some(class)) = (&task.spec.resources.gpu, &task.gpu_class) {
            let figures = classes.entry(class.clone()).or_default();
            figures.allocated += i64::from(gpu.count);
            if task.state == TaskState::Running
                && let Some(heartbeat) = &active.heartbeat
            {
                for sample in &heartbeat.gpus {
                    figures.reporting += 1;
                    if let Some(percent) = sample.utilization_percent {
                        figures.utilization_sum += percent / 100.0;
                        figures.utilization_samples += 1;
                    }
                    figures.memory_used += sample.memory_used_bytes.unwrap_or(0) as f64;
                }
            }
        }
        if task.state == TaskState::Running {
            let hourly = prices.hourly(&task.spec, task.gpu_class.as_deref()).total();
            *rates
                .entry((
                    metrics.bounded("tenant", &task.tenant),
                    metrics.bounded("queue", &task.spec.queue),
                ))
                .or_default() += hourly;
        }
    }
    f.gpus_allocated.clear();
    f.gpus_reporting.clear();
    f.gpu_utilization.clear();
    f.gpu_memory_used.clear();
    for (class, figures) in classes {
        let labels = GpuClassLabels { gpu_class: class };
        f.gpus_allocated
            .get_or_create(&labels)
            .set(figures.allocated);
        f.gpus_reporting
            .get_or_create(&labels)
            .set(figures.reporting);
        if figures.utilization_samples > 0 {
            f.gpu_utilization
                .get_or_create(&labels)
                .set(figures.utilization_sum / f64::from(figures.utilization_samples));
        }
        if figures.reporting > 0 {
            f.gpu_memory_used
                .get_or_create(&labels)
                .set(figures.memory_used);
        }
    }
    f.cost_rate.clear();
    for ((tenant, queue), rate) in rates {
        f.cost_rate
            .get_or_create(&TenantQueueLabels { tenant, queue })
            .set(rate);
    }
    f.tenant_spend.clear();
    f.tenant_budget.clear();
    for (tenant, budget, spent) in spend {
        let tenant = metrics.bounded("tenant", &tenant);
        for period in Period::ALL {
            let labels = BudgetLabels {
                tenant: tenant.clone(),
                period: period.into(),
            };
            f.tenant_spend.get_or_create(&labels).set(spent.of(period));
            if let Some(limit) = budget.limit(period) {
                f.tenant_budget.get_or_create(&labels).set(limit);
            }
        }
    }
    Ok(())
}

/// What the active tasks of one GPU class hold and report.
#[derive(Default)]
struct ClassFigures {
    allocated: i64,
    reporting: i64,
    utilization_sum: f64,
    utilization_samples: u32,
    memory_used: f64,
}
