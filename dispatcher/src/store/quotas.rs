//! Tenant quotas on running work and the facts the fair choice needs: a tenant's quota
//! (read and replaced whole), the admission check a claim makes in its own transaction,
//! each tenant's head of a queue band, tasks held by their quota, a queued task's position
//! and the recent launch rate.
//!
//! Invariants:
//! - a claim ([`Step::within_quota`](crate::task::lifecycle::Step::within_quota)) stamps
//!   its tenant's `last_claimed_at` first, which locks the tenant's row until the claim
//!   commits (an `UPDATE` locks in PostgreSQL; SQLite's write transaction is exclusive),
//!   then counts the tenant's active tasks: claims of one tenant are serialised, so
//!   launchers cannot together take a tenant past its quota. Only claims make a task
//!   active, so counting under that lock is exact for the limit (tasks that end meanwhile
//!   only make it conservative);
//! - the counts behind a queue position are indexed and bounded by a `LIMIT`, so a read
//!   costs at most the position itself, never a scan of a long queue.

use std::collections::BTreeMap;

use sqlx::{Any, Row as _, Transaction};

use super::row::{self, millis, task_columns};
use super::{During as _, Result, Store, StoreError};
use crate::task::quota::{self, Ask, Candidate, OverQuota, QueuePosition, TenantQuota, Usage};
use crate::task::{Reason, Task, TaskId, TaskSpec, TaskState};

/// The states whose tasks hold a Job or a process: what a running quota limits.
pub const ACTIVE: [TaskState; 3] = [
    TaskState::Launching,
    TaskState::Launched,
    TaskState::Running,
];

/// How many held tasks of one tenant a re-offer pass looks at.
const REOFFER_BATCH: u32 = 32;

/// What a queued task is told about its wait, as counted by the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaitFigures {
    pub position: QueuePosition,
    /// Tasks of its queue launched since the time asked about.
    pub launched_since: u64,
}

/// What one more task of `task`'s current attempt asks of a quota.
fn ask_of(task: &Task) -> Ask {
    Ask {
        gpus: task
            .spec
            .resources
            .gpu
            .as_ref()
            .zip(task.gpu_class.clone())
            .map(|(gpu, class)| (class, gpu.count)),
    }
}

/// What the claim's admission check found.
pub(super) enum Admission {
    Admitted,
    /// The task is not in the expected state (the compare-and-set would write nothing).
    NotInState,
}

impl Store {
    /// Tenant `name`'s quota; [`StoreError::UnknownTenant`] if there is no such tenant.
    pub async fn tenant_quota(&self, name: &str) -> Result<TenantQuota> {
        self.timed("tenant_quota", async {
            let during = || format!("reading the quota of tenant '{name}'");
            let max_running: Option<(Option<i64>,)> =
                sqlx::query_as("SELECT max_running FROM tenants WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .during(during)?;
            let Some((max_running,)) = max_running else {
                return Err(StoreError::UnknownTenant {
                    tenant: name.to_owned(),
                });
            };
            let classes: Vec<(String, i64)> = sqlx::query_as(
                "SELECT gpu_class, max_gpus FROM tenant_gpu_quotas WHERE tenant = $1 \
                 ORDER BY gpu_class",
            )
            .bind(name)
            .fetch_all(&self.pool)
            .await
            .during(during)?;
            let record = || format!("quota of tenant '{name}'");
            let count = |value: i64| {
                u32::try_from(value).map_err(|e| StoreError::corrupt(record(), e.to_string()))
            };
            Ok(TenantQuota {
                max_running: max_running.map(count).transpose()?,
                max_gpus: classes
                    .into_iter()
                    .map(|(class, max)| Ok((class, count(max)?)))
                    .collect::<Result<_>>()?,
            })
        })
        .await
    }

    /// Replaces tenant `name`'s quota with `quota` (the default clears it), in one
    /// transaction. [`StoreError::UnknownTenant`] if there is no such tenant.
    pub async fn set_tenant_quota(&self, name: &str, quota: &TenantQuota) -> Result<()> {
        self.timed("set_tenant_quota", async {
            let during = || format!("setting the quota of tenant '{name}'");
            let mut tx = self.begin_write().await.during(during)?;
            let updated = sqlx::query("UPDATE tenants SET max_running = $2 WHERE name = $1")
                .bind(name)
                .bind(quota.max_running.map(i64::from))
                .execute(&mut *tx)
                .await
                .during(during)?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::UnknownTenant {
                    tenant: name.to_owned(),
                });
            }
            sqlx::query("DELETE FROM tenant_gpu_quotas WHERE tenant = $1")
                .bind(name)
                .execute(&mut *tx)
                .await
                .during(during)?;
            for (class, max) in &quota.max_gpus {
                sqlx::query(
                    "INSERT INTO tenant_gpu_quotas (tenant, gpu_class, max_gpus) VALUES ($1, $2, $3)",
                )
                .bind(name)
                .bind(class)
                .bind(i64::from(*max))
                .execute(&mut *tx)
                .await
                .during(during)?;
            }
            tx.commit().await.during(during)?;
            Ok(())
        })
        .await
    }

    /// The claim's admission check, inside its transaction `tx`, before its
    /// compare-and-set: stamps the tenant as claimed at `at` (locking its row), then asks
    /// [`quota::admit`]. [`StoreError::OverQuota`] when the quota does not admit the task.
    pub(super) async fn admit_claim(
        tx: &mut Transaction<'static, Any>,
        id: TaskId,
        from: TaskState,
        at: i64,
    ) -> Result<Admission> {
        let during = || format!("checking the quota for claiming task {id}");
        let task: Option<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT tenant, spec, gpu_class FROM tasks WHERE id = $1 AND state = $2",
        )
        .bind(id.to_string())
        .bind(from.as_str())
        .fetch_optional(&mut **tx)
        .await
        .during(during)?;
        let Some((tenant, spec, gpu_class)) = task else {
            return Ok(Admission::NotInState);
        };
        let record = || format!("task {id}");
        let spec: TaskSpec = serde_json::from_str(&spec)
            .map_err(|e| StoreError::corrupt(record(), format!("column spec: {e}")))?;
        // The lock: claims of one tenant wait here for each other.
        let limits: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "UPDATE tenants SET last_claimed_at = $2 WHERE name = $1 \
             RETURNING max_running, disabled_at",
        )
        .bind(&tenant)
        .bind(at)
        .fetch_optional(&mut **tx)
        .await
        .during(during)?;
        let (max_running, disabled_at) = limits.unwrap_or((None, None));
        // A disabled tenant's tasks wait, held like tasks over a quota, until it is enabled.
        if disabled_at.is_some() {
            return Err(StoreError::OverQuota {
                task_id: id,
                source: OverQuota::Disabled { tenant },
            });
        }
        let ask = Ask {
            gpus: spec
                .resources
                .gpu
                .as_ref()
                .zip(gpu_class)
                .map(|(gpu, class)| (class, gpu.count)),
        };
        let mut quota = TenantQuota {
            max_running: max_running.map(|max| u32::try_from(max).unwrap_or(u32::MAX)),
            max_gpus: BTreeMap::new(),
        };
        if let Some((class, _)) = &ask.gpus {
            let max: Option<(i64,)> = sqlx::query_as(
                "SELECT max_gpus FROM tenant_gpu_quotas WHERE tenant = $1 AND gpu_class = $2",
            )
            .bind(&tenant)
            .bind(class)
            .fetch_optional(&mut **tx)
            .await
            .during(during)?;
            if let Some((max,)) = max {
                quota
                    .max_gpus
                    .insert(class.clone(), u32::try_from(max).unwrap_or(u32::MAX));
            }
        }
        if !quota.is_set() {
            return Ok(Admission::Admitted);
        }
        let mut usage = Usage::default();
        if quota.max_running.is_some() {
            let running: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM tasks WHERE tenant = $1 AND state IN ($2, $3, $4)",
            )
            .bind(&tenant)
            .bind(ACTIVE[0].as_str())
            .bind(ACTIVE[1].as_str())
            .bind(ACTIVE[2].as_str())
            .fetch_one(&mut **tx)
            .await
            .during(during)?;
            usage.running = u32::try_from(running).unwrap_or(u32::MAX);
        }
        if let Some((class, _)) = &ask.gpus
            && quota.max_gpus.contains_key(class)
        {
            // The GPU count is in the spec; the tenant's active tasks of one class are few
            // (the quota bounds them), so they are summed here.
            let specs: Vec<(String,)> = sqlx::query_as(
                "SELECT spec FROM tasks WHERE tenant = $1 AND gpu_class = $2 \
                 AND state IN ($3, $4, $5)",
            )
            .bind(&tenant)
            .bind(class)
            .bind(ACTIVE[0].as_str())
            .bind(ACTIVE[1].as_str())
            .bind(ACTIVE[2].as_str())
            .fetch_all(&mut **tx)
            .await
            .during(during)?;
            let mut held: u32 = 0;
            for (spec,) in specs {
                let spec: TaskSpec = serde_json::from_str(&spec).map_err(|e| {
                    StoreError::corrupt(format!("a task of tenant '{tenant}'"), e.to_string())
                })?;
                held = held.saturating_add(spec.resources.gpu.map_or(0, |gpu| gpu.count));
            }
            usage.gpus.insert(class.clone(), held);
        }
        quota::admit(&tenant, &quota, &usage, &ask)
            .map(|()| Admission::Admitted)
            .map_err(|source| StoreError::OverQuota {
                task_id: id,
                source,
            })
    }

    /// Every tenant with queued tasks in `queue` between priorities `band` (inclusive)
    /// that may be claimed now (not backing off before a retry): its first in dispatch
    /// order, when it was last claimed, and whether its running quota is full. One row per
    /// tenant, each from indexed lookups.
    pub async fn fair_candidates(&self, queue: &str, band: (i32, i32)) -> Result<Vec<Candidate>> {
        self.timed("fair_candidates", async {
            let during = || format!("choosing the next tenant of queue '{queue}'");
            let rows = sqlx::query(
                "SELECT n.name, n.last_claimed_at, \
                 CAST(CASE WHEN n.disabled_at IS NOT NULL THEN 1 \
                 WHEN n.max_running IS NULL THEN 0 \
                 WHEN (SELECT COUNT(*) FROM tasks a WHERE a.tenant = n.name \
                 AND a.state IN ($5, $6, $7)) >= n.max_running THEN 1 ELSE 0 END AS BIGINT) \
                 AS at_quota, \
                 (SELECT t.id FROM tasks t WHERE t.tenant = n.name AND t.state = $1 \
                 AND t.queue = $2 AND t.priority >= $3 AND t.priority <= $4 \
                 AND (t.next_attempt_at IS NULL OR t.next_attempt_at <= $8) \
                 ORDER BY t.priority DESC, t.id LIMIT 1) AS head \
                 FROM tenants n",
            )
            .bind(TaskState::Queued.as_str())
            .bind(queue)
            .bind(band.0)
            .bind(band.1)
            .bind(ACTIVE[0].as_str())
            .bind(ACTIVE[1].as_str())
            .bind(ACTIVE[2].as_str())
            .bind(millis(jiff::Timestamp::now()))
            .fetch_all(&self.pool)
            .await
            .during(during)?;
            let mut candidates = Vec::new();
            for row in rows {
                let head: Option<String> = row.try_get("head").during(during)?;
                let Some(head) = head else { continue };
                let tenant: String = row.try_get("name").during(during)?;
                candidates.push(Candidate {
                    head: row::parse(&head, "id", &|| format!("task {head}"))?,
                    last_claimed_at: row.try_get("last_claimed_at").during(during)?,
                    at_quota: row.try_get::<i64, _>("at_quota").during(during)? != 0,
                    tenant,
                });
            }
            Ok(candidates)
        })
        .await
    }

    /// Tasks held by their tenant's quota (queued, reason `tenant_quota`) that the quota
    /// admits now ([`quota::admissible`], from the tenant's active tasks), at most
    /// [`REOFFER_BATCH`] per tenant looked at, highest priority and oldest first: the
    /// launcher offers them to the queue again.
    pub async fn held_with_room(&self) -> Result<Vec<Task>> {
        self.timed("held_with_room", async {
            let during = || "listing tasks held by a tenant quota".to_owned();
            let tenants: Vec<(String,)> = sqlx::query_as(
                "SELECT n.name FROM tenants n WHERE n.disabled_at IS NULL \
                 AND EXISTS (SELECT 1 FROM tasks h \
                 WHERE h.state = $1 AND h.reason = $2 AND h.tenant = n.name)",
            )
            .bind(TaskState::Queued.as_str())
            .bind(Reason::TenantQuota.as_str())
            .fetch_all(&self.pool)
            .await
            .during(during)?;
            let mut offered = Vec::new();
            for (tenant,) in tenants {
                let quota = self.tenant_quota(&tenant).await?;
                let usage = self.quota_usage(&tenant, &quota).await?;
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM tasks WHERE state = $1 AND reason = $2 AND tenant = $3 \
                     ORDER BY priority DESC, id LIMIT $4"
                ))
                .bind(TaskState::Queued.as_str())
                .bind(Reason::TenantQuota.as_str())
                .bind(&tenant)
                .bind(i64::from(REOFFER_BATCH))
                .fetch_all(&self.pool)
                .await
                .during(during)?;
                let held: Vec<Task> = rows.iter().map(row::task).collect::<Result<_>>()?;
                let asks: Vec<Ask> = held.iter().map(ask_of).collect();
                let admitted = quota::admissible(&tenant, &quota, &usage, &asks);
                offered.extend(
                    held.into_iter()
                        .enumerate()
                        .filter(|(index, _)| admitted.contains(index))
                        .map(|(_, task)| task),
                );
            }
            Ok(offered)
        })
        .await
    }

    /// What `tenant`'s active tasks hold, as far as `quota` limits it: their number, and
    /// their GPUs of the classes it limits.
    async fn quota_usage(&self, tenant: &str, quota: &TenantQuota) -> Result<Usage> {
        let during = || format!("reading what tenant '{tenant}' runs");
        let active: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT spec, gpu_class FROM tasks WHERE tenant = $1 AND state IN ($2, $3, $4)",
        )
        .bind(tenant)
        .bind(ACTIVE[0].as_str())
        .bind(ACTIVE[1].as_str())
        .bind(ACTIVE[2].as_str())
        .fetch_all(&self.pool)
        .await
        .during(during)?;
        let mut usage = Usage {
            running: u32::try_from(active.len()).unwrap_or(u32::MAX),
            gpus: BTreeMap::new(),
        };
        for (spec, class) in active {
            let Some(class) = class.filter(|class| quota.max_gpus.contains_key(class)) else {
                continue;
            };
            let spec: TaskSpec = serde_json::from_str(&spec).map_err(|e| {
                StoreError::corrupt(format!("a task of tenant '{tenant}'"), e.to_string())
            })?;
            let held = usage.gpus.entry(class).or_default();
            *held = held.saturating_add(spec.resources.gpu.map_or(0, |gpu| gpu.count));
        }
        Ok(usage)
    }

    /// How many tasks wait on their tenant's quota, by tenant (the gauge).
    pub async fn waiting_on_quota(&self) -> Result<Vec<(String, i64)>> {
        self.timed("waiting_on_quota", async {
            sqlx::query_as(
                "SELECT tenant, COUNT(*) FROM tasks WHERE state = $1 AND reason = $2 \
                 GROUP BY tenant ORDER BY tenant",
            )
            .bind(TaskState::Queued.as_str())
            .bind(Reason::TenantQuota.as_str())
            .fetch_all(&self.pool)
            .await
            .during(|| "counting tasks waiting on a tenant quota".to_owned())
        })
        .await
    }

    /// What queued `task` is told about its wait (see [`crate::task::quota`] for the
    /// position's definition), and how many tasks of its queue were launched since
    /// `since`. Two statements of indexed counts, each bounded by the position.
    pub async fn wait_figures(&self, task: &Task, since: jiff::Timestamp) -> Result<WaitFigures> {
        self.timed("wait_figures", async {
            let during = || format!("placing task {} in its queue", task.id);
            let (low, high) = quota::band(task.spec.priority);
            let queued = TaskState::Queued.as_str();
            let own_before: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM tasks WHERE tenant = $1 AND state = $2 AND queue = $3 \
                 AND priority >= $4 AND priority <= $5 \
                 AND (priority > $6 OR (priority = $6 AND id < $7))",
            )
            .bind(&task.tenant)
            .bind(queued)
            .bind(&task.spec.queue)
            .bind(low)
            .bind(high)
            .bind(task.spec.priority)
            .bind(task.id.to_string())
            .fetch_one(&self.pool)
            .await
            .during(during)?;
            // Each other tenant goes at most once per round before this task's round.
            let rounds = own_before + 1;
            let (higher, others, launched): (i64, i64, i64) = sqlx::query_as(
                "SELECT \
                 (SELECT COUNT(*) FROM tasks WHERE state = $1 AND queue = $2 AND priority > $4), \
                 (SELECT CAST(COALESCE(SUM((SELECT COUNT(*) FROM (SELECT 1 FROM tasks t \
                 WHERE t.tenant = n.name AND t.state = $1 AND t.queue = $2 \
                 AND t.priority >= $3 AND t.priority <= $4 LIMIT $5) s)), 0) AS BIGINT) \
                 FROM tenants n WHERE n.name <> $6), \
                 (SELECT COUNT(*) FROM tasks WHERE queue = $2 AND launched_at >= $7)",
            )
            .bind(queued)
            .bind(&task.spec.queue)
            .bind(low)
            .bind(high)
            .bind(rounds)
            .bind(&task.tenant)
            .bind(millis(since))
            .fetch_one(&self.pool)
            .await
            .during(during)?;
            let count = |value: i64| u64::try_from(value).unwrap_or(0);
            Ok(WaitFigures {
                position: QueuePosition {
                    higher_bands: count(higher),
                    own_before: count(own_before),
                    others: count(others),
                },
                launched_since: count(launched),
            })
        })
        .await
    }
}

/// Adds `change` (+1 or -1) to `tenant`'s count of queued tasks, in the transaction that
/// stores the task entering or leaving the queued state: the count the submit's quota
/// check reads instead of counting the queue (migration 0011).
pub(super) async fn count_queued(
    tx: &mut Transaction<'static, Any>,
    tenant: &str,
    change: i64,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query("UPDATE tenants SET queued_tasks = queued_tasks + $2 WHERE name = $1")
        .bind(tenant)
        .bind(change)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
