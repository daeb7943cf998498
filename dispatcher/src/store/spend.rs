//! Spend, budgets and the figures behind the state gauges: read-only aggregates over the
//! tasks table, plus setting a tenant's budget.
//!
//! Spend is attributed to the moment a task finished (its settled compute cost plus its
//! LLM cost); a task still running adds what it has cost so far (its compute up to now at
//! today's prices, plus the LLM cost reported so far), so a budget sees a long run before
//! it ends.

use std::collections::BTreeMap;

use protocol::Heartbeat;

use super::row::{self, millis, task_columns};
use super::{During as _, Result, Store, StoreError};
use crate::cost::{Breakdown, Budget, Period, SpendParts};
use crate::task::{Reason, Task, TaskState};

/// How `GET /v1/usage` groups spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Queue,
    Day,
}

/// One group of a usage report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct UsageGroup {
    /// The queue name, or the UTC day (`2026-11-30`).
    pub key: String,
    pub tasks: i64,
    pub compute: Breakdown,
    pub llm_dollars: f64,
    pub total_dollars: f64,
}

/// An active (launched or running) task as the gauges see it.
#[derive(Debug, Clone)]
pub struct ActiveTask {
    pub task: Task,
    pub heartbeat: Option<Heartbeat>,
}

/// Queued tasks of one queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueFigures {
    pub queue: String,
    pub depth: i64,
    pub oldest_queued_at: Option<jiff::Timestamp>,
}

const UTC_DAY_MILLIS: i64 = 86_400_000;

impl Store {
    /// Sets (or, with `None`s, clears) tenant `name`'s budgets. [`StoreError::UnknownTenant`]
    /// if there is no such tenant.
    pub async fn set_budget(&self, name: &str, budget: &Budget) -> Result<()> {
        // No `Option<f64>` binds: sqlx 0.9's Any driver sends a NULL f64 as a float4
        // parameter, and PostgreSQL's cached statement then refuses the next non-NULL
        // float8 ("incorrect binary data format"; sqlx issue #4284, fixed upstream by
        // #4359 after 0.9.0). A flag says which amounts are set.
        let updated = sqlx::query(
            "UPDATE tenants SET \
             daily_budget_dollars = CASE WHEN $3 THEN $2 ELSE NULL END, \
             monthly_budget_dollars = CASE WHEN $5 THEN $4 ELSE NULL END, \
             budget_action = $6 WHERE name = $1",
        )
        .bind(name)
        .bind(budget.daily_dollars.unwrap_or_default())
        .bind(budget.daily_dollars.is_some())
        .bind(budget.monthly_dollars.unwrap_or_default())
        .bind(budget.monthly_dollars.is_some())
        .bind(budget.action.as_str())
        .execute(&self.pool)
        .await
        .during(|| format!("setting the budget of tenant '{name}'"))?
        .rows_affected();
        if updated == 0 {
            return Err(StoreError::UnknownTenant {
                tenant: name.to_owned(),
            });
        }
        Ok(())
    }

    /// Every tenant with a budget, by name.
    pub async fn budgets(&self) -> Result<Vec<(String, Budget)>> {
        self.timed("budgets", async {
            let rows: Vec<(String, Option<f64>, Option<f64>, String)> = sqlx::query_as(
                "SELECT name, daily_budget_dollars, monthly_budget_dollars, budget_action \
                 FROM tenants WHERE daily_budget_dollars IS NOT NULL \
                 OR monthly_budget_dollars IS NOT NULL ORDER BY name",
            )
            .fetch_all(&self.pool)
            .await
            .during(|| "listing tenant budgets".to_owned())?;
            rows.into_iter()
                .map(|(name, daily, monthly, action)| {
                    let action = action.parse().map_err(|e: String| {
                        StoreError::corrupt(
                            format!("tenant '{name}'"),
                            format!("column budget_action: {e}"),
                        )
                    })?;
                    Ok((
                        name,
                        Budget {
                            daily_dollars: daily,
                            monthly_dollars: monthly,
                            action,
                        },
                    ))
                })
                .collect()
        })
        .await
    }

    /// What `tenant`'s spend in the current UTC day and month is made of: the settled
    /// cost of its tasks finished in them (the daily sums kept with each finish: at most
    /// 31 rows, however many tasks), and its unfinished tasks that have cost something
    /// (read once, priced by [`crate::cost::Prices::spend`]).
    pub async fn spend_parts(&self, tenant: &str, now: jiff::Timestamp) -> Result<SpendParts> {
        self.timed("spend", async {
            let during = || format!("summing the spend of tenant '{tenant}'");
            // The day lies inside the month, so the month's rows (at most 31) hold both.
            let (day, month): (f64, f64) = sqlx::query_as(
                "SELECT \
                 COALESCE(SUM(CASE WHEN day >= $2 THEN dollars ELSE 0.0 END), 0.0), \
                 COALESCE(SUM(dollars), 0.0) \
                 FROM tenant_daily_spend WHERE tenant = $1 AND day >= $3",
            )
            .bind(tenant)
            .bind(unix_day(millis(Period::Day.start(now))))
            .bind(unix_day(millis(Period::Month.start(now))))
            .fetch_one(&self.pool)
            .await
            .during(during)?;
            Ok(SpendParts {
                finished_day_dollars: day,
                finished_month_dollars: month,
                unfinished: self.unfinished_with_cost(tenant).await?,
            })
        })
        .await
    }

    /// Tasks not finished that have cost something (started, or reported LLM cost).
    async fn unfinished_with_cost(&self, tenant: &str) -> Result<Vec<Task>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE tenant = $1 AND finished_at IS NULL \
             AND (started_at IS NOT NULL OR llm_cost_dollars > 0)"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .during(|| "reading unfinished tasks with a cost".to_owned())?;
        rows.iter().map(row::task).collect()
    }

    /// `tenant`'s spend on tasks finished in `[from, to)`, grouped (what unfinished tasks
    /// have cost so far is in [`Store::spend`]).
    pub async fn usage(
        &self,
        tenant: &str,
        from: jiff::Timestamp,
        to: jiff::Timestamp,
        group_by: GroupBy,
    ) -> Result<Vec<UsageGroup>> {
        self.timed("usage", async {
            macro_rules! usage_by {
                ($key:literal) => {
                    concat!(
                        "SELECT ",
                        $key,
                        " AS group_key, COUNT(*) AS tasks, \
                         COALESCE(SUM(COALESCE(gpu_cost_dollars, 0.0)), 0.0) AS gpu, \
                         COALESCE(SUM(COALESCE(cpu_cost_dollars, 0.0)), 0.0) AS cpu, \
                         COALESCE(SUM(COALESCE(memory_cost_dollars, 0.0)), 0.0) AS memory, \
                         COALESCE(SUM(llm_cost_dollars), 0.0) AS llm \
                         FROM tasks WHERE tenant = $1 AND finished_at >= $2 AND finished_at < $3 \
                         GROUP BY group_key ORDER BY group_key"
                    )
                };
            }
            let query = match group_by {
                GroupBy::Queue => usage_by!("queue"),
                GroupBy::Day => usage_by!("CAST(finished_at / 86400000 AS TEXT)"),
            };
            let rows: Vec<(String, i64, f64, f64, f64, f64)> = sqlx::query_as(query)
                .bind(tenant)
                .bind(millis(from))
                .bind(millis(to))
                .fetch_all(&self.pool)
                .await
                .during(|| format!("reading the usage of tenant '{tenant}'"))?;
            let groups = rows
                .into_iter()
                .map(|(key, tasks, gpu, cpu, memory, llm)| {
                    let key = match group_by {
                        GroupBy::Queue => key,
                        GroupBy::Day => key
                            .parse::<i64>()
                            .ok()
                            .and_then(|day| {
                                jiff::Timestamp::from_millisecond(day * UTC_DAY_MILLIS).ok()
                            })
                            .map_or(key, |day| day.strftime("%Y-%m-%d").to_string()),
                    };
                    let compute = Breakdown { gpu, cpu, memory };
                    UsageGroup {
                        key,
                        tasks,
                        total_dollars: crate::cost::round_cents(compute.total() + llm),
                        compute: Breakdown {
                            gpu: crate::cost::round_cents(gpu),
                            cpu: crate::cost::round_cents(cpu),
                            memory: crate::cost::round_cents(memory),
                        },
                        llm_dollars: crate::cost::round_cents(llm),
                    }
                })
                .collect();
            Ok(groups)
        })
        .await
    }

    /// Launched and running tasks with their latest heartbeat (GPU gauges, cost rate).
    pub async fn active_tasks(&self) -> Result<Vec<ActiveTask>> {
        self.timed("active_tasks", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                ", last_heartbeat FROM tasks WHERE state IN ($1, $2)"
            ))
            .bind(TaskState::Launched.as_str())
            .bind(TaskState::Running.as_str())
            .fetch_all(&self.pool)
            .await
            .during(|| "reading active tasks".to_owned())?;
            rows.iter()
                .map(|found| {
                    let task = row::task(found)?;
                    let heartbeat: Option<String> = sqlx::Row::try_get(found, "last_heartbeat")
                        .map_err(|e| {
                            StoreError::corrupt(format!("task {}", task.id), e.to_string())
                        })?;
                    // A heartbeat that does not decode only loses its GPU figures.
                    let heartbeat = heartbeat.and_then(|text| serde_json::from_str(&text).ok());
                    Ok(ActiveTask { task, heartbeat })
                })
                .collect()
        })
        .await
    }

    /// Depth and oldest entry of every queue with queued tasks.
    pub async fn queue_figures(&self) -> Result<Vec<QueueFigures>> {
        self.timed("queue_figures", async {
            let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(
                "SELECT queue, COUNT(*), MIN(COALESCE(queued_at, created_at)) FROM tasks \
                 WHERE state = $1 GROUP BY queue ORDER BY queue",
            )
            .bind(TaskState::Queued.as_str())
            .fetch_all(&self.pool)
            .await
            .during(|| "reading queue depths".to_owned())?;
            Ok(rows
                .into_iter()
                .map(|(queue, depth, oldest)| QueueFigures {
                    queue,
                    depth,
                    oldest_queued_at: oldest
                        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()),
                })
                .collect())
        })
        .await
    }

    /// How many tasks are stuck, by reason: queued since before `queued_before`,
    /// launching since before `launching_before`, launched with reason `unschedulable`,
    /// running with reason `heartbeat_lost`.
    pub async fn stuck_counts(
        &self,
        queued_before: jiff::Timestamp,
        launching_before: jiff::Timestamp,
    ) -> Result<BTreeMap<&'static str, i64>> {
        self.timed("stuck_counts", async {
            let (queued, launching, unschedulable, heartbeat_lost): (i64, i64, i64, i64) =
                sqlx::query_as(
                    "SELECT \
                     COALESCE(SUM(CASE WHEN state = $3 AND COALESCE(queued_at, created_at) < $1 THEN 1 ELSE 0 END), 0), \
                     COALESCE(SUM(CASE WHEN state = $4 AND updated_at < $2 THEN 1 ELSE 0 END), 0), \
                     COALESCE(SUM(CASE WHEN state = $5 AND reason = $7 THEN 1 ELSE 0 END), 0), \
                     COALESCE(SUM(CASE WHEN state = $6 AND reason = $8 THEN 1 ELSE 0 END), 0) \
                     FROM tasks WHERE state IN ($3, $4, $5, $6)",
                )
                .bind(millis(queued_before))
                .bind(millis(launching_before))
                .bind(TaskState::Queued.as_str())
                .bind(TaskState::Launching.as_str())
                .bind(TaskState::Launched.as_str())
                .bind(TaskState::Running.as_str())
                .bind(Reason::Unschedulable.as_str())
                .bind(Reason::HeartbeatLost.as_str())
                .fetch_one(&self.pool)
                .await
                .during(|| "counting stuck tasks".to_owned())?;
            Ok(BTreeMap::from([
                ("queued_too_long", queued),
                ("launching_stale", launching),
                (Reason::Unschedulable.as_str(), unschedulable),
                (Reason::HeartbeatLost.as_str(), heartbeat_lost),
            ]))
        })
        .await
    }

    /// Connections of the pool: (in use, idle, max).
    #[must_use]
    pub fn pool_figures(&self) -> (u32, u32, u32) {
        let size = self.pool.size();
        let idle = u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX);
        (
            size.saturating_sub(idle),
            idle,
            self.pool.options().get_max_connections(),
        )
    }
}

/// The Unix day of a time in milliseconds (UTC days: what `tenant_daily_spend.day` holds).
fn unix_day(at_millis: i64) -> i64 {
    at_millis.div_euclid(MILLIS_PER_DAY)
}

const MILLIS_PER_DAY: i64 = 86_400_000;

/// Adds `dollars` to what `tenant`'s tasks that finished on the day of `finished_at`
/// cost, in the transaction that records the finish or a later LLM cost.
pub(super) async fn add_daily_spend(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    tenant: &str,
    finished_at_millis: i64,
    dollars: f64,
) -> std::result::Result<(), sqlx::Error> {
    if dollars == 0.0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO tenant_daily_spend (tenant, day, dollars) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant, day) DO UPDATE SET dollars = tenant_daily_spend.dollars + excluded.dollars",
    )
    .bind(tenant)
    .bind(unix_day(finished_at_millis))
    .bind(dollars)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
