//! Durable state: tenants, tasks with their labels, and every task's event history, in
//! PostgreSQL or in one SQLite file, behind one [`Store`].
//!
//! What it owns: the schema (numbered migrations in `dispatcher/migrations/postgres` and
//! `dispatcher/migrations/sqlite`, embedded and run by [`Store::migrate`]) and every read
//! and write of it. Nothing else in the dispatcher speaks SQL.
//!
//! Invariants:
//! - every state change is a compare-and-set (`UPDATE … WHERE id = $1 AND state =
//!   $expected`) that writes its [`TaskEvent`] row in the same transaction: a task's state
//!   and its history never disagree, and nothing is ever half-written;
//! - a move that [`TaskState::can_move_to`] forbids is refused before anything is written;
//!   a note ([`Store::note`]: why a task waits, without a state change) is the same CAS
//!   on the state, with its event, and never touches a terminal task;
//! - a task is created queued, together with its labels and its first event
//!   (`None → queued`), in one transaction that first checks the tenant's quota; the
//!   tenant's row is locked for that check, so concurrent submissions cannot overshoot it;
//! - an idempotency key names at most one task per tenant (a unique index), whatever the
//!   concurrency: a replay with the same request hash gets that task back, a replay with
//!   another hash is refused;
//! - tenant-facing reads ([`Store::get_task`], [`Store::list_tasks`]) never show another
//!   tenant's tasks;
//! - a task's events have increasing ids in the order they were written (its transitions
//!   are serialised by the row the CAS updates), so `after_event_id` is a safe cursor.
//!
//! One set of SQL serves both backends: `$N` placeholders, BIGINT unix milliseconds, TEXT
//! ids (hyphenated UUIDv7, whose text order is their time order) and the spec as JSON
//! TEXT. The backends differ in two places only: SQLite write transactions begin
//! `IMMEDIATE` (writers queue on the busy timeout instead of failing on a lock upgrade),
//! and PostgreSQL locks the tenant row with `FOR NO KEY UPDATE` (SQLite's write lock
//! already serialises writers).
//!
//! Errors: [`StoreError::Unavailable`] means the database could not be reached or stayed
//! busy (retry later; the API answers 503); `TenantExists`, `ApiKeyInUse`,
//! `UnknownTenant`, `QuotaExceeded`, `IdempotencyConflict`, `TaskExists`, `NotQueued` and
//! `IllegalTransition` are refusals with nothing written; the rest are bugs or a broken
//! database.

mod error;
mod reports;
mod row;
mod spend;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyConnection, AnyPool, Connection as _, Transaction};
use tracing::instrument;

pub use error::{Result, StoreError};
pub use reports::{LastHeartbeat, Recorded, StoredBody, StoredReport, TERMINATION_SEQUENCE};
pub use spend::{ActiveTask, Budget, BudgetAction, GroupBy, QueueFigures, Spend, UsageGroup};

use crate::cost::{Breakdown, Prices};
use crate::metrics::{Metrics, Stage};
use crate::task::{Reason, Task, TaskId, TaskState, Timeline};
use row::{event_columns, millis, task_columns, tenant_columns};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a query waits for a pooled connection (including connecting) before the
/// store reports [`StoreError::Unavailable`]: a request fails fast while the database is
/// down instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an SQLite connection waits for another writer before giving up (the error is
/// then [`StoreError::Unavailable`]).
const SQLITE_BUSY_TIMEOUT_PRAGMA: &str = "PRAGMA busy_timeout = 5000";

/// A tenant: who may submit, and how many of its tasks may wait at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub max_queued_tasks: u32,
    pub created_at: jiff::Timestamp,
    pub budget: Budget,
}

/// The database behind a [`Store`], chosen by the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `postgres://…` or `postgresql://…`
    Postgres,
    /// `sqlite://PATH` (the file is created if missing) or `sqlite::memory:`
    Sqlite,
}

impl Backend {
    fn from_url(url: &str) -> Result<Self> {
        let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
        match scheme {
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "sqlite" => Ok(Self::Sqlite),
            other => Err(StoreError::UnsupportedUrl {
                scheme: other.to_owned(),
            }),
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }

    fn migrator(self) -> &'static Migrator {
        match self {
            Self::Postgres => &POSTGRES_MIGRATIONS,
            Self::Sqlite => &SQLITE_MIGRATIONS,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// A state change for [`Store::transition`]. `reason`, `message` and `exit_code` describe
/// the new state and replace the task's previous ones (`None` clears them); `attempt`, when
/// given, becomes the task's attempt number (a retry), otherwise it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub to: TaskState,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    /// Set a new attempt number (which also forgets the last attempt's heartbeat).
    pub attempt: Option<u32>,
    /// Set the GPU class of the (new) attempt.
    pub gpu_class: Option<String>,
}

impl Transition {
    /// A move to `state`, with no reason, message or exit code.
    #[must_use]
    pub fn to(state: TaskState) -> Self {
        Self {
            to: state,
            reason: None,
            message: None,
            exit_code: None,
            attempt: None,
            gpu_class: None,
        }
    }

    #[must_use]
    pub fn reason(mut self, reason: Reason) -> Self {
        self.reason = Some(reason);
        self
    }

    #[must_use]
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    #[must_use]
    pub fn exit_code(mut self, exit_code: i32) -> Self {
        self.exit_code = Some(exit_code);
        self
    }

    #[must_use]
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }

    #[must_use]
    pub fn gpu_class(mut self, class: impl Into<String>) -> Self {
        self.gpu_class = Some(class.into());
        self
    }
}

/// One row of a task's history: a state change with the attempt it belongs to, or a note
/// ([`Store::note`]) where `from` and `to` are the same state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEvent {
    pub id: i64,
    pub task_id: TaskId,
    pub attempt: u32,
    /// `None` for the task's creation.
    pub from: Option<TaskState>,
    pub to: TaskState,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    pub at: jiff::Timestamp,
}

/// The dispatcher's durable state. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Counts transitions, queries and spend.
    metrics: Metrics,
    /// Prices a task's compute when it finishes.
    prices: Arc<Prices>,
}

/// Maps a database error to a [`StoreError`] naming what the store was doing.
pub(crate) trait During<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> During<T> for std::result::Result<T, sqlx::Error> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| StoreError::sqlx(what(), source))
    }
}

impl Store {
    /// Connects to `url` (`postgres://…`, `sqlite://PATH`) with a pool of at most
    /// `max_connections`. An SQLite file is created if missing and switched to WAL.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let during = || format!("connecting to the {backend} database");
        let url = match backend {
            Backend::Postgres => url.to_owned(),
            Backend::Sqlite => {
                let url = sqlite_url(url);
                // WAL lets readers run beside the writer. It is a property of the file,
                // so it is set once, on a connection of its own, before the pool opens.
                let mut connection = AnyConnection::connect(&url).await.during(during)?;
                sqlx::query("PRAGMA journal_mode = WAL")
                    .execute(&mut connection)
                    .await
                    .during(during)?;
                connection.close().await.during(during)?;
                url
            }
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        sqlx::query(SQLITE_BUSY_TIMEOUT_PRAGMA)
                            .execute(&mut *connection)
                            .await?;
                        sqlx::query("PRAGMA foreign_keys = ON")
                            .execute(&mut *connection)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .during(during)?;
        Ok(Self {
            pool,
            backend,
            metrics: Metrics::default(),
            prices: Arc::new(Prices::default()),
        })
    }

    /// This store, counting into `metrics` and pricing finished tasks with `prices`.
    #[must_use]
    pub fn with_observability(mut self, metrics: Metrics, prices: Prices) -> Self {
        self.metrics = metrics;
        self.prices = Arc::new(prices);
        self
    }

    /// Runs one store operation, counting and timing it.
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        let result = call.await;
        // A refused request (quota, conflict, unknown tenant) is an answer, not a failure
        // of the database.
        let failed = matches!(
            result,
            Err(StoreError::Unavailable { .. }
                | StoreError::Database { .. }
                | StoreError::Corrupt { .. })
        );
        self.metrics
            .store_query(operation, !failed, started.elapsed());
        result
    }

    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    #[must_use]
    pub fn prices(&self) -> &Prices {
        &self.prices
    }

    #[must_use]
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Brings the schema up to date; running it again is a no-op.
    pub async fn migrate(&self) -> Result<()> {
        self.backend
            .migrator()
            .run(&self.pool)
            .await
            .map_err(|source| StoreError::migrate(self.backend, source))
    }

    /// A round trip to the database (readiness).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .during(|| "pinging the database".to_owned())?;
        Ok(())
    }

    /// Closes every connection; later calls fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Registers a tenant. [`StoreError::TenantExists`] if the name is taken,
    /// [`StoreError::ApiKeyInUse`] if another tenant has the same api key hash.
    pub async fn create_tenant(
        &self,
        name: &str,
        api_key_hash: &str,
        max_queued_tasks: u32,
    ) -> Result<Tenant> {
        let during = || format!("creating tenant '{name}'");
        let created_at = now_millis();
        let inserted = sqlx::query(
            "INSERT INTO tenants (name, api_key_hash, max_queued_tasks, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(name)
        .bind(api_key_hash)
        .bind(i64::from(max_queued_tasks))
        .bind(created_at)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(Tenant {
                name: name.to_owned(),
                max_queued_tasks,
                created_at: row::timestamp(created_at, &during)?,
                budget: Budget::default(),
            }),
            Err(error) if is_unique_violation(&error) => {
                let name_taken: Option<i64> =
                    sqlx::query_scalar("SELECT 1 FROM tenants WHERE name = $1")
                        .bind(name)
                        .fetch_optional(&self.pool)
                        .await
                        .during(during)?;
                let tenant = name.to_owned();
                Err(if name_taken.is_some() {
                    StoreError::TenantExists { tenant }
                } else {
                    StoreError::ApiKeyInUse { tenant }
                })
            }
            Err(error) => Err(StoreError::sqlx(during(), error)),
        }
    }

    /// The tenant whose api key hashes to `api_key_hash` (authentication).
    pub async fn tenant_by_key_hash(&self, api_key_hash: &str) -> Result<Option<Tenant>> {
        self.timed("tenant_by_key_hash", async {
            let row = sqlx::query(concat!(
                "SELECT ",
                tenant_columns!(),
                " FROM tenants WHERE api_key_hash = $1"
            ))
            .bind(api_key_hash)
            .fetch_optional(&self.pool)
            .await
            .during(|| "looking up a tenant by api key".to_owned())?;
            row.as_ref().map(row::tenant).transpose()
        })
        .await
    }

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
            task.created_at = row::timestamp(millis(task.created_at), &during)?;
            task.updated_at = row::timestamp(millis(task.updated_at), &during)?;
            task.timeline = Timeline {
                queued_at: Some(task.created_at),
                ..Timeline::default()
            };

            let mut tx = self.begin_write().await.during(during)?;
            let lock_tenant = match self.backend {
                Backend::Postgres => {
                    "SELECT max_queued_tasks FROM tenants WHERE name = $1 FOR NO KEY UPDATE"
                }
                Backend::Sqlite => "SELECT max_queued_tasks FROM tenants WHERE name = $1",
            };
            let limit: Option<i64> = sqlx::query_scalar(lock_tenant)
                .bind(&task.tenant)
                .fetch_optional(&mut *tx)
                .await
                .during(during)?;
            let Some(limit) = limit else {
                return Err(StoreError::UnknownTenant {
                    tenant: task.tenant,
                });
            };

            if let Some(idempotency) = &idempotency
                && let Some(replayed) = Self::replay(&mut tx, &task.tenant, idempotency, id).await?
            {
                return Ok(replayed);
            }

            let queued: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE tenant = $1 AND state = 'queued'")
                    .bind(&task.tenant)
                    .fetch_one(&mut *tx)
                    .await
                    .during(during)?;
            if queued >= limit {
                return Err(StoreError::QuotaExceeded {
                    tenant: task.tenant,
                    limit: u32::try_from(limit).unwrap_or(u32::MAX),
                });
            }

            let inserted = sqlx::query(
                "INSERT INTO tasks (id, tenant, name, queue, priority, spec, state, reason, \
                 message, attempt, exit_code, idempotency_key, request_hash, created_at, updated_at, \
                 gpu_class, queued_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $14) \
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

    /// The tenant's tasks matching `filter`, newest first (id descending), at most
    /// `filter.limit`, only ids below `filter.before`. Pages chained by passing the last
    /// id as `before` see every task exactly once.
    pub async fn list_tasks(&self, tenant: &str, filter: &ListFilter) -> Result<Vec<Task>> {
        self.timed("list_tasks", async {
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
                concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM tasks WHERE {} ORDER BY id DESC LIMIT ${}"
                ),
                clauses.join(" AND "),
                texts.len() + 1
            );

            // Every fragment above is ours; values are only ever bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for text in texts {
                query = query.bind(text);
            }
            let rows = query
                .bind(i64::from(filter.limit))
                .fetch_all(&self.pool)
                .await
                .during(|| format!("listing the tasks of tenant '{tenant}'"))?;
            rows.iter().map(row::task).collect()
        })
        .await
    }

    /// Compare-and-set: moves task `id` from `expected` to `change.to` and writes the event,
    /// in one transaction. `Ok(None)` (nothing written) when the task does not exist or is
    /// not in `expected`; [`StoreError::IllegalTransition`] (nothing written) when
    /// `expected` may never move to `change.to`.
    #[instrument(level = "debug", skip_all, fields(task_id = %id, from = %expected, to = %change.to))]
    pub async fn transition(
        &self,
        id: TaskId,
        expected: TaskState,
        change: &Transition,
    ) -> Result<Option<Task>> {
        self.timed("transition", async {
            if !expected.can_move_to(change.to) {
                return Err(StoreError::IllegalTransition {
                    task_id: id,
                    from: expected,
                    to: change.to,
                });
            }
            let during = || format!("moving task {id} from {expected} to {}", change.to);
            let now = now_millis();
            let mut tx = self.begin_write().await.during(during)?;
            let updated = sqlx::query(concat!(
                "UPDATE tasks SET state = $3, reason = $4, message = $5, exit_code = $6, \
                 attempt = COALESCE($7, attempt), updated_at = $8, \
                 gpu_class = COALESCE($9, gpu_class), \
                 last_heartbeat_at = CASE WHEN $7 IS NULL THEN last_heartbeat_at ELSE NULL END, \
                 last_heartbeat = CASE WHEN $7 IS NULL THEN last_heartbeat ELSE NULL END, \
                 queued_at = CASE WHEN $3 = 'queued' THEN $8 ELSE queued_at END, \
                 launched_at = CASE WHEN $3 = 'queued' THEN NULL \
                     WHEN $3 IN ('launched', 'running') AND launched_at IS NULL THEN $8 \
                     ELSE launched_at END, \
                 started_at = CASE WHEN $3 = 'queued' THEN NULL \
                     WHEN $3 = 'running' AND started_at IS NULL THEN $8 ELSE started_at END, \
                 finished_at = CASE WHEN $3 IN ('succeeded', 'failed', 'cancelled', 'timed_out', \
                     'expired') THEN $8 ELSE finished_at END \
                 WHERE id = $1 AND state = $2 RETURNING ",
                task_columns!()
            ))
            .bind(id.to_string())
            .bind(expected.as_str())
            .bind(change.to.as_str())
            .bind(change.reason.map(Reason::as_str))
            .bind(change.message.as_deref())
            .bind(change.exit_code)
            .bind(change.attempt.map(|attempt| attempt as i32))
            .bind(now)
            .bind(change.gpu_class.as_deref())
            .fetch_optional(&mut *tx)
            .await
            .during(during)?;
            let Some(updated) = updated else {
                tx.rollback().await.during(during)?;
                return Ok(None);
            };
            let mut task = row::task(&updated)?;
            if task.state.is_terminal() {
                let compute = self.compute_cost(&task, now);
                sqlx::query(
                    "UPDATE tasks SET gpu_cost_dollars = $2, cpu_cost_dollars = $3, \
                     memory_cost_dollars = $4 WHERE id = $1",
                )
                .bind(id.to_string())
                .bind(compute.gpu)
                .bind(compute.cpu)
                .bind(compute.memory)
                .execute(&mut *tx)
                .await
                .during(during)?;
                task.spent.compute = Some(compute);
            }
            insert_event(&mut tx, id, Some(expected), &task, now)
                .await
                .during(during)?;
            tx.commit().await.during(during)?;
            self.observe_transition(expected, &task, now);
            Ok(Some(task))
        })
        .await
    }

    /// The compute cost of `task` ending at `now_millis`: its prices for the time since it
    /// started running; nothing if it never ran.
    fn compute_cost(&self, task: &Task, now_millis: i64) -> Breakdown {
        task.timeline
            .started_at
            .map_or_else(Breakdown::default, |start| {
                let ran = Duration::from_millis(
                    u64::try_from(now_millis - millis(start)).unwrap_or_default(),
                );
                self.prices
                    .for_duration(&task.spec, task.gpu_class.as_deref(), ran)
            })
    }

    /// Counts a committed transition: launches, outcomes, stage latencies, compute cost.
    fn observe_transition(&self, from: TaskState, task: &Task, now_millis: i64) {
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
        let tasks = self.metrics.tasks();
        let queue = &task.spec.queue;
        let since = |start: Option<jiff::Timestamp>| {
            start.map(|start| (now_millis - millis(start)).max(0) as f64 / 1000.0)
        };
        let stage = |stage: Stage, seconds: Option<f64>| {
            if let Some(seconds) = seconds {
                tasks.stage(stage, queue, seconds);
            }
        };
        let launched = task.state == TaskState::Launched
            || (task.state == TaskState::Running && from == TaskState::Launching);
        if launched {
            tasks.launched(queue, task.gpu_class.as_deref());
            stage(Stage::QueuedToLaunched, since(task.timeline.queued_at));
        }
        if task.state == TaskState::Running && from == TaskState::Launched {
            stage(Stage::LaunchedToRunning, since(task.timeline.launched_at));
        }
        if task.state.is_terminal() {
            tasks.finished(queue, task.state, task.reason);
            stage(Stage::RunningToFinished, since(task.timeline.started_at));
            if let Some(compute) = &task.spent.compute {
                self.metrics.compute_cost(&task.tenant, queue, compute);
            }
        }
    }

    /// Records why a task waits without changing its state (a pod no node can hold): sets
    /// the task's `reason` and `message` if it is still in `state`, and writes an event
    /// `state → state` carrying them, in one transaction. `Ok(None)` (nothing written)
    /// when the task does not exist or is not in `state`; noting what the task already
    /// says writes nothing and returns it. A terminal task keeps its outcome:
    /// [`StoreError::IllegalTransition`].
    #[instrument(level = "debug", skip_all, fields(task_id = %id, state = %state, reason = %reason))]
    pub async fn note(
        &self,
        id: TaskId,
        state: TaskState,
        reason: Reason,
        message: &str,
    ) -> Result<Option<Task>> {
        self.timed("note", async {
            if state.is_terminal() {
                return Err(StoreError::IllegalTransition {
                    task_id: id,
                    from: state,
                    to: state,
                });
            }
            let during = || format!("noting {reason} on task {id}");
            let now = now_millis();
            let mut tx = self.begin_write().await.during(during)?;
            let updated = sqlx::query(concat!(
                "UPDATE tasks SET reason = $3, message = $4, updated_at = $5 \
                 WHERE id = $1 AND state = $2 \
                 AND (reason IS NULL OR reason <> $3 OR message IS NULL OR message <> $4) \
                 RETURNING ",
                task_columns!()
            ))
            .bind(id.to_string())
            .bind(state.as_str())
            .bind(reason.as_str())
            .bind(message)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .during(during)?;
            let Some(updated) = updated else {
                tx.rollback().await.during(during)?;
                // Either already noted (the task as it is) or no longer in `state` (None).
                return Ok(self.task(id).await?.filter(|task| task.state == state));
            };
            let task = row::task(&updated)?;
            insert_event(&mut tx, id, Some(state), &task, now)
                .await
                .during(during)?;
            tx.commit().await.during(during)?;
            Ok(Some(task))
        })
        .await
    }

    /// Task `id`'s events in the order they happened, only those after `after_event_id`.
    pub async fn events(&self, id: TaskId, after_event_id: Option<i64>) -> Result<Vec<TaskEvent>> {
        self.timed("events", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                event_columns!(),
                " FROM task_events WHERE task_id = $1 AND id > $2 ORDER BY id"
            ))
            .bind(id.to_string())
            .bind(after_event_id.unwrap_or(0))
            .fetch_all(&self.pool)
            .await
            .during(|| format!("reading the events of task {id}"))?;
            rows.iter().map(row::event).collect()
        })
        .await
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

    /// The queued tasks of `queue` in dispatch order (priority descending, then oldest
    /// first), at most `limit`.
    pub async fn next_queued(&self, queue: &str, limit: u32) -> Result<Vec<Task>> {
        self.timed("next_queued", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE state = 'queued' AND queue = $1 \
                 ORDER BY priority DESC, id LIMIT $2"
            ))
            .bind(queue)
            .bind(i64::from(limit))
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

    /// A write transaction. SQLite takes its write lock up front (`BEGIN IMMEDIATE`), so a
    /// writer waits its turn on the busy timeout instead of failing when it would upgrade
    /// a read lock another writer invalidated.
    async fn begin_write(&self) -> std::result::Result<Transaction<'static, Any>, sqlx::Error> {
        match self.backend {
            Backend::Postgres => self.pool.begin().await,
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
        }
    }
}

/// The event row of `task` reaching its current state from `from`.
async fn insert_event(
    tx: &mut Transaction<'static, Any>,
    id: TaskId,
    from: Option<TaskState>,
    task: &Task,
    at: i64,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO task_events \
         (task_id, attempt, from_state, to_state, reason, message, exit_code, at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id.to_string())
    .bind(task.attempt as i32)
    .bind(from.map(TaskState::as_str))
    .bind(task.state.as_str())
    .bind(task.reason.map(Reason::as_str))
    .bind(task.message.as_deref())
    .bind(task.exit_code)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn now_millis() -> i64 {
    millis(jiff::Timestamp::now())
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}

/// `sqlite://PATH` with `mode=rwc` (create the file if missing) unless a mode is given.
fn sqlite_url(url: &str) -> String {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    if path.ends_with(":memory:") || query.split('&').any(|pair| pair.starts_with("mode=")) {
        url.to_owned()
    } else if query.is_empty() {
        format!("{path}?mode=rwc")
    } else {
        format!("{url}&mode=rwc")
    }
}

#[cfg(test)]
mod tests {
    use super::{Backend, sqlite_url};

    #[test]
    fn the_scheme_picks_the_backend() {
        assert_eq!(
            Backend::from_url("postgres://u@h:5432/db").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("postgresql://h/db").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("sqlite:///var/lib/agent-bus/state.db").ok(),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            Backend::from_url("mysql://h/db")
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some("unsupported database url scheme 'mysql': expected postgres:// or sqlite://")
        );
    }

    #[test]
    fn sqlite_files_are_created_unless_a_mode_is_given() {
        assert_eq!(
            sqlite_url("sqlite:///tmp/x.db"),
            "sqlite:///tmp/x.db?mode=rwc"
        );
        assert_eq!(
            sqlite_url("sqlite://x.db?cache=private"),
            "sqlite://x.db?cache=private&mode=rwc"
        );
        assert_eq!(sqlite_url("sqlite://x.db?mode=ro"), "sqlite://x.db?mode=ro");
        assert_eq!(sqlite_url("sqlite::memory:"), "sqlite::memory:");
    }
}
