//! Tasks: creating one (with its labels, first event, quota check and idempotency key),
//! and every read of tasks: by id, a tenant's pages, by state for reconcilers, the head of
//! a queue, counts by state.

use sqlx::any::AnyRow;
use sqlx::{Any, Transaction};
use tracing::instrument;

use super::transitions::insert_event;
use super::{Backend, During as _, Result, Store, StoreError, is_unique_violation, row};
use crate::store::row::{millis, summary_columns, task_columns};
use crate::task::{Reason, Task, TaskId, TaskState, TaskSummary, Timeline};

/// A task to store: `task.state` must be [`TaskState::Queued`] (its attempt is normally
/// 1), with the submission's idempotency key if it had one.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub task: Task,
    pub idempotency: Option<Idempotency>,
}

impl NewTask {
    #[must_use]
    pub fn new(task: Task) -> Self {
        Self {
            task,
            idempotency: None,
        }
    }

    /// The same task, submitted under `key` with a body that hashes to `request_hash`.
    #[must_use]
    pub fn idempotent(mut self, key: impl Into<String>, request_hash: impl Into<String>) -> Self {
        self.idempotency = Some(Idempotency {
            key: key.into(),
            request_hash: request_hash.into(),
        });
        self
    }
}

/// A submission's `Idempotency-Key` and the hash of its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub request_hash: String,
}

/// What [`Store::insert_task`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// The task is new and stored.
    Created(Task),
    /// The tenant already submitted this key with this body: the original task, as it is
    /// now. Nothing was written.
    Replayed(Task),
}

impl Inserted {
    #[must_use]
    pub fn task(&self) -> &Task {
        match self {
            Self::Created(task) | Self::Replayed(task) => task,
        }
    }

    #[must_use]
    pub fn into_task(self) -> Task {
        match self {
            Self::Created(task) | Self::Replayed(task) => task,
        }
    }

    #[must_use]
    pub fn is_replayed(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }
}

/// Which of a tenant's tasks [`Store::list_tasks`] returns: newest first, at most `limit`,
/// only ids older than `before` (the previous page's last id) when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    pub state: Option<TaskState>,
    pub queue: Option<String>,
    /// `(key, value)`: only tasks with this label.
    pub label: Option<(String, String)>,
    pub limit: u32,
    pub before: Option<TaskId>,
}

impl ListFilter {
    /// No filter, pages of `limit`.
    #[must_use]
    pub fn new(limit: u32) -> Self {
        Self {
            state: None,
            queue: None,
            label: None,
            limit,
            before: None,
        }
    }

    #[must_use]
    pub fn state(mut self, state: TaskState) -> Self {
        self.state = Some(state);
        self
    }

    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.label = Some((key.into(), value.into()));
        self
    }

    #[must_use]
    pub fn before(mut self, id: TaskId) -> Self {
        self.before = Some(id);
        self
    }
}

impl Store {
    /// Stores a new queued task with its labels and first event, in one transaction, after
    /// the tenant's quota check (a tenant with `max_queued_tasks` queued tasks gets
    /// [`StoreError::QuotaExceeded`]).
    ///
    /// With an idempotency key: if the tenant already stored a task under it, the same
    /// request hash gives [`Inserted::Replayed`] with that task (even over quota), another
    /// hash gives [`StoreError::IdempotencyConflict`]; nothing is written either way.
    /// `INSERT … ON CONFLICT (tenant, idempotency_key) DO NOTHING` keeps this true under
    /// concurrent submissions of one key: exactly one is created, the others replay it.
    ///
    /// The stored task (times truncated to milliseconds) is returned.
    #[instrument(level = "debug", skip_all, fields(task_id = %new.task.id, tenant = %new.task.tenant))]
    pub async fn insert_task(&self, new: NewTask) -> Result<Inserted> {
        self.timed("insert_task", async {
            let NewTask {
                mut task,
                idempotency,
            } = new;
            let id = task.id;
            let during = || format!("inserting task {id}");
            if task.state != TaskState::Queued {
                return Err(StoreError::NotQueued {
                    task_id: id,
                    state: task.state,
                });
            }
            let spec = serde_json::to_string(&task.spec).map_err(|source| StoreError::EncodeSpec {
                task_id: id,
                source,
            })?;
            // Beside the blob for the list's summary view, which never reads the blob.
            let resources = serde_json::to_string(&task.spec.resources).map_err(|source| {
                StoreError::EncodeSpec {
                    task_id: id,
                    source,
                }
            })?;
            task.created_at = row::timestamp(millis(task.created_at), &during)?;
            task.updated_at = row::timestamp(millis(task.updated_at), &during)?;
            task.expires_at = task
                .expires_at
                .map(|at| row::timestamp(millis(at), &during))
                .transpose()?;
            task.timeline = Timeline {
                queued_at: Some(task.created_at),
                ..Timeline::default()
            };

            let mut tx = self.begin_write().await.during(during)?;
            // The tenant's row, locked: its queued-task counter is read and written
            // under the lock, so concurrent submits cannot both take the last place.
            let lock_tenant = match self.backend {
                Backend::Postgres => {
                    "SELECT max_queued_tasks, queued_tasks FROM tenants WHERE name = $1 \
                     FOR NO KEY UPDATE"
                }
                Backend::Sqlite => {
                    "SELECT max_queued_tasks, queued_tasks FROM tenants WHERE name = $1"
                }
            };
            let counted: Option<(i64, i64)> = sqlx::query_as(lock_tenant)
                .bind(&task.tenant)
                .fetch_optional(&mut *tx)
                .await
                .during(during)?;
            let Some((limit, queued)) = counted else {
                return Err(StoreError::UnknownTenant {
                    tenant: task.tenant,
                });
            };

            if let Some(idempotency) = &idempotency
                && let Some(replayed) = Self::replay(&mut tx, &task.tenant, idempotency, id).await?
            {
                return Ok(replayed);
            }

            if queued >= limit {
                return Err(StoreError::QuotaExceeded {
                    tenant: task.tenant,
                    limit: u32::try_from(limit).unwrap_or(u32::MAX),
                });
            }

            let inserted = sqlx::query(
                "INSERT INTO tasks (id, tenant, name, queue, priority, spec, state, reason, \
                 message, attempt, exit_code, idempotency_key, request_hash, created_at, updated_at, \
                 gpu_class, queued_at, expires_at, image, resources, timeout_seconds) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $14, \
                 $17, $18, $19, $20) \
                 ON CONFLICT (tenant, idempotency_key) DO NOTHING",
            )
            .bind(id.to_string())
            .bind(&task.tenant)
            .bind(&task.spec.name)
            .bind(&task.spec.queue)
            .bind(task.spec.priority)
            .bind(spec)
            .bind(task.state.as_str())
            .bind(task.reason.map(Reason::as_str))
            .bind(task.message.as_deref())
            .bind(task.attempt as i32)
            .bind(task.exit_code)
            .bind(idempotency.as_ref().map(|i| i.key.as_str()))
            .bind(idempotency.as_ref().map(|i| i.request_hash.as_str()))
            .bind(millis(task.created_at))
            .bind(millis(task.updated_at))
            .bind(task.gpu_class.as_deref())
            .bind(task.expires_at.map(millis))
            .bind(&task.spec.image)
            .bind(resources)
            .bind(i64::from(task.spec.timeout_seconds))
            .execute(&mut *tx)
            .await;
            let inserted = match inserted {
                Err(error) if is_unique_violation(&error) => {
                    return Err(StoreError::TaskExists { task_id: id });
                }
                other => other.during(during)?.rows_affected(),
            };
            if inserted == 0 {
                // Another submission of this key committed between our check and our insert
                // (only possible without the tenant lock, but cheap to handle): replay it.
                if let Some(idempotency) = &idempotency
                    && let Some(replayed) = Self::replay(&mut tx, &task.tenant, idempotency, id).await?
                {
                    return Ok(replayed);
                }
                return Err(StoreError::corrupt(
                    format!("task {id}"),
                    "insert skipped on an idempotency conflict, but no task holds the key",
                ));
            }

            super::quotas::count_queued(&mut tx, &task.tenant, 1)
                .await
                .during(during)?;
            for (key, value) in &task.spec.labels {
                sqlx::query("INSERT INTO task_labels (task_id, key, value) VALUES ($1, $2, $3)")
                    .bind(id.to_string())
                    .bind(key)
                    .bind(value)
                    .execute(&mut *tx)
                    .await
                    .during(during)?;
            }
            insert_event(&mut tx, id, None, &task, millis(task.created_at))
                .await
                .during(during)?;
            tx.commit().await.during(during)?;
            Ok(Inserted::Created(task))
        })
        .await
    }

    /// What [`Store::insert_task`] would answer for `new` if its idempotency key is already
    /// taken, writing nothing: [`Inserted::Replayed`] (same request hash) or
    /// [`StoreError::IdempotencyConflict`] (another); `None` without a key or for a new key.
    /// For refusals that must not hide a replay (a spent budget).
    pub async fn existing_replay(&self, new: &NewTask) -> Result<Option<Inserted>> {
        let Some(idempotency) = &new.idempotency else {
            return Ok(None);
        };
        self.timed("existing_replay", async {
            let id = new.task.id;
            let mut tx = self
                .pool
                .begin()
                .await
                .during(|| format!("inserting task {id}"))?;
            Self::replay(&mut tx, &new.task.tenant, idempotency, id).await
        })
        .await
    }

    /// The task the tenant stored under `idempotency.key`, if any, as a replay (same hash)
    /// or a conflict (another hash).
    async fn replay(
        tx: &mut Transaction<'static, Any>,
        tenant: &str,
        idempotency: &Idempotency,
        id: TaskId,
    ) -> Result<Option<Inserted>> {
        let during = || format!("inserting task {id}");
        let found = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            ", request_hash FROM tasks WHERE tenant = $1 AND idempotency_key = $2"
        ))
        .bind(tenant)
        .bind(&idempotency.key)
        .fetch_optional(&mut **tx)
        .await
        .during(during)?;
        let Some(found) = found else {
            return Ok(None);
        };
        let stored_hash: Option<String> = sqlx::Row::try_get(&found, "request_hash")
            .map_err(|e| StoreError::corrupt("task", format!("column request_hash: {e}")))?;
        if stored_hash.as_deref() == Some(idempotency.request_hash.as_str()) {
            Ok(Some(Inserted::Replayed(row::task(&found)?)))
        } else {
            Err(StoreError::IdempotencyConflict {
                key: idempotency.key.clone(),
            })
        }
    }

    /// The tenant's task `id`; `None` if it does not exist or belongs to another tenant.
    pub async fn get_task(&self, tenant: &str, id: TaskId) -> Result<Option<Task>> {
        self.timed("get_task", async {
            let row = sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE id = $1 AND tenant = $2"
            ))
            .bind(id.to_string())
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await
            .during(|| format!("reading task {id}"))?;
            row.as_ref().map(row::task).transpose()
        })
        .await
    }

    /// Task `id` whoever owns it (launcher, watcher, reconcilers).
    pub async fn task(&self, id: TaskId) -> Result<Option<Task>> {
        self.timed("task", async {
            let row = sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE id = $1"
            ))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .during(|| format!("reading task {id}"))?;
            row.as_ref().map(row::task).transpose()
        })
        .await
    }

    /// The summary of one task, without its spec blob: what the watcher decides from.
    pub async fn task_summary(&self, id: TaskId) -> Result<Option<TaskSummary>> {
        self.timed("task_summary", async {
            let row = sqlx::query(concat!(
                "SELECT ",
                summary_columns!(),
                " FROM tasks WHERE id = $1"
            ))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .during(|| format!("reading task {id}"))?;
            row.as_ref().map(row::task_summary).transpose()
        })
        .await
    }

    /// The tenant's tasks matching `filter`, newest first (id descending), at most
    /// `filter.limit`, only ids below `filter.before`. Pages chained by passing the last
    /// id as `before` see every task exactly once.
    pub async fn list_tasks(&self, tenant: &str, filter: &ListFilter) -> Result<Vec<Task>> {
        self.timed("list_tasks", async {
            let rows = self.list_rows(tenant, filter, task_columns!()).await?;
            rows.iter().map(row::task).collect()
        })
        .await
    }

    /// [`Store::list_tasks`] without the spec blob: the columns of a list page's summary
    /// only, so a page costs what its table shows, not a mebibyte per task.
    pub async fn list_task_summaries(
        &self,
        tenant: &str,
        filter: &ListFilter,
    ) -> Result<Vec<TaskSummary>> {
        self.timed("list_task_summaries", async {
            let rows = self.list_rows(tenant, filter, summary_columns!()).await?;
            rows.iter().map(row::task_summary).collect()
        })
        .await
    }

    /// The rows of `columns` of the tenant's tasks matching `filter` (see
    /// [`Store::list_tasks`]).
    async fn list_rows(
        &self,
        tenant: &str,
        filter: &ListFilter,
        columns: &'static str,
    ) -> Result<Vec<AnyRow>> {
        let mut clauses = vec!["tenant = $1".to_owned()];
        let mut texts: Vec<String> = vec![tenant.to_owned()];
        let mut next = |value: String| {
            texts.push(value);
            texts.len()
        };
        if let Some(state) = filter.state {
            let n = next(state.as_str().to_owned());
            clauses.push(format!("state = ${n}"));
        }
        if let Some(queue) = &filter.queue {
            let n = next(queue.clone());
            clauses.push(format!("queue = ${n}"));
        }
        if let Some((key, value)) = &filter.label {
            let key = next(key.clone());
            let value = next(value.clone());
            clauses.push(format!(
                "EXISTS (SELECT 1 FROM task_labels l \
                 WHERE l.task_id = tasks.id AND l.key = ${key} AND l.value = ${value})"
            ));
        }
        if let Some(before) = filter.before {
            let n = next(before.to_string());
            clauses.push(format!("id < ${n}"));
        }
        let sql = format!(
            "SELECT {columns} FROM tasks WHERE {} ORDER BY id DESC LIMIT ${}",
            clauses.join(" AND "),
            texts.len() + 1
        );

        // Every fragment above is ours; values are only ever bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for text in texts {
            query = query.bind(text);
        }
        query
            .bind(i64::from(filter.limit))
            .fetch_all(&self.pool)
            .await
            .during(|| format!("listing the tasks of tenant '{tenant}'"))
    }

    /// Tasks in `state` last changed before `updated_before`, oldest change first, at most
    /// `limit`: for reconcilers (queued tasks missing from the queue, launches stuck).
    pub async fn tasks_in_state(
        &self,
        state: TaskState,
        updated_before: jiff::Timestamp,
        limit: u32,
    ) -> Result<Vec<Task>> {
        self.timed("tasks_in_state", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE state = $1 AND updated_at < $2 \
                 ORDER BY updated_at, id LIMIT $3"
            ))
            .bind(state.as_str())
            .bind(millis(updated_before))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .during(|| format!("listing {state} tasks"))?;
            rows.iter().map(row::task).collect()
        })
        .await
    }

    /// Every task in `state` last changed before `updated_before`, however many, read
    /// `page` at a time in id order ([`StatePages::next`]): what a sweep walks.
    #[must_use]
    pub fn pages_in_state(
        &self,
        state: TaskState,
        updated_before: jiff::Timestamp,
        page: u32,
    ) -> StatePages<'_> {
        StatePages {
            store: self,
            state,
            updated_before,
            page,
            after: None,
            done: false,
        }
    }

    /// A page of the tasks in `state` last changed before `updated_before`, in id order
    /// after the cursor `after` (the last id of the previous page; `None` for the first),
    /// at most `limit`: a sweep that reads every such task, however many, a page at a
    /// time. Summaries: a sweep decides from columns and never reads a spec blob.
    pub async fn summaries_in_state_page(
        &self,
        state: TaskState,
        updated_before: jiff::Timestamp,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskSummary>> {
        self.timed("summaries_in_state_page", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                summary_columns!(),
                " FROM tasks WHERE state = $1 AND updated_at < $2 AND id > $3 \
                 ORDER BY id LIMIT $4"
            ))
            .bind(state.as_str())
            .bind(millis(updated_before))
            .bind(after.map_or_else(String::new, |id| id.to_string()))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .during(|| format!("listing a page of {state} tasks"))?;
            rows.iter().map(row::task_summary).collect()
        })
        .await
    }

    /// Takes over a stale claim (a task left in `launching` by a launcher that stopped
    /// before recording an outcome) for one relaunch: a compare-and-set on the
    /// `updated_at` the caller read, which it moves to `now`. `true` for exactly one of
    /// the launchers that try with the same reading; the others leave the task alone,
    /// so a stale claim is relaunched by one replica, and again only once it is stale
    /// again. Not a state move: the task stays `launching`.
    pub async fn take_stale_claim(
        &self,
        id: TaskId,
        seen_updated_at: jiff::Timestamp,
        now: jiff::Timestamp,
    ) -> Result<bool> {
        self.timed("take_stale_claim", async {
            let taken = sqlx::query(
                "UPDATE tasks SET updated_at = $4 WHERE id = $1 AND state = $2 AND updated_at = $3",
            )
            .bind(id.to_string())
            .bind(TaskState::Launching.as_str())
            .bind(millis(seen_updated_at))
            .bind(millis(now).max(millis(seen_updated_at) + 1))
            .execute(&self.pool)
            .await
            .during(|| format!("taking over the stale claim of task {id}"))?
            .rows_affected();
            Ok(taken == 1)
        })
        .await
    }

    /// The queued tasks of `queue` in dispatch order (priority descending, then oldest
    /// first), at most `limit`.
    pub async fn next_queued(&self, queue: &str, limit: u32) -> Result<Vec<Task>> {
        self.timed("next_queued", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE state = $3 AND queue = $1 \
                 ORDER BY priority DESC, id LIMIT $2"
            ))
            .bind(queue)
            .bind(i64::from(limit))
            .bind(TaskState::Queued.as_str())
            .fetch_all(&self.pool)
            .await
            .during(|| format!("reading the head of queue '{queue}'"))?;
            rows.iter().map(row::task).collect()
        })
        .await
    }

    /// How many tasks are in each state, every state listed (zeros included) in
    /// [`TaskState::ALL`] order, for gauges.
    pub async fn count_by_state(&self) -> Result<Vec<(TaskState, i64)>> {
        self.timed("count_by_state", async {
            let during = || "counting tasks by state".to_owned();
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT state, COUNT(*) FROM tasks GROUP BY state")
                    .fetch_all(&self.pool)
                    .await
                    .during(during)?;
            let mut counts: Vec<(TaskState, i64)> =
                TaskState::ALL.iter().map(|&state| (state, 0)).collect();
            for (state, count) in rows {
                let state = state
                    .parse::<TaskState>()
                    .map_err(|e| StoreError::corrupt("task state count", e.to_string()))?;
                if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == state) {
                    slot.1 = count;
                }
            }
            Ok(counts)
        })
        .await
    }

    /// Queued tasks whose queue TTL ran out by `now`, soonest deadline first, at most
    /// `limit`: the expiry sweep (an index on state and deadline keeps it cheap).
    pub async fn overdue_queued(&self, now: jiff::Timestamp, limit: u32) -> Result<Vec<TaskId>> {
        self.timed("overdue_queued", async {
            let ids: Vec<(String,)> = sqlx::query_as(
                "SELECT id FROM tasks WHERE state = $1 AND expires_at <= $2 \
                 ORDER BY expires_at LIMIT $3",
            )
            .bind(TaskState::Queued.as_str())
            .bind(millis(now))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .during(|| "listing queued tasks past their queue TTL".to_owned())?;
            ids.into_iter()
                .map(|(id,)| row::parse(&id, "id", &|| format!("task {id}")))
                .collect()
        })
        .await
    }
}

/// The pages of [`Store::pages_in_state`]: the cursor (the last id read) moves on after
/// each page, and a page shorter than asked is the last one.
#[derive(Debug)]
pub struct StatePages<'a> {
    store: &'a Store,
    state: TaskState,
    updated_before: jiff::Timestamp,
    page: u32,
    after: Option<TaskId>,
    done: bool,
}

impl StatePages<'_> {
    /// The next page; `None` once every task was read.
    pub async fn next(&mut self) -> Result<Option<Vec<TaskSummary>>> {
        if self.done {
            return Ok(None);
        }
        let tasks = self
            .store
            .summaries_in_state_page(self.state, self.updated_before, self.after, self.page)
            .await?;
        self.done = tasks.len() < self.page as usize;
        self.after = tasks.last().map(|task| task.id);
        Ok((!tasks.is_empty()).then_some(tasks))
    }
}
