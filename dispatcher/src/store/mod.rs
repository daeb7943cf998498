//! Durable state: tenants, tasks with their labels, every task's event history, runner
//! reports and spend, in PostgreSQL or in one SQLite file, behind one [`Store`]. It
//! persists what others decide: it neither plans state moves ([`crate::task::lifecycle`]
//! does) nor prices tasks ([`crate::cost`] does) nor counts metrics (callers do; the store
//! only reports how long each operation took to its [`OperationObserver`]).
//!
//! What it owns: the schema (numbered migrations in `dispatcher/migrations/postgres` and
//! `dispatcher/migrations/sqlite`, embedded and run by [`Store::migrate`]) and every read
//! and write of it. Nothing else in the dispatcher speaks SQL. By concern:
//! [`tenants`](Store::create_tenant), [`tasks`](Store::insert_task) and their queries,
//! [`transitions`](Store::transition) and notes, [`quotas`](Store::tenant_quota) and the
//! fair choice, [`events`](Store::events), runner
//! [`reports`](Store::record_reports), output [`logs`](Store::record_logs),
//! [`spend`](Store::usage) and budgets, the [`webhook outbox`](Store::claim_deliveries)
//! and the tenants' webhook settings.
//!
//! Invariants:
//! - every state change is a compare-and-set (`UPDATE … WHERE id = $1 AND state =
//!   $expected`) that writes its [`TaskEvent`] row (and the webhook delivery it makes, if
//!   any) in the same transaction: a task's state, its history and its outbox never
//!   disagree, and nothing is ever half-written;
//! - a step that [`TaskState::can_move_to`] forbids is refused before anything is written;
//!   a note ([`Store::record_note`]: why a task waits, without a state change) is the same CAS
//!   on the state, with its event, and never touches a terminal task;
//! - SQL receives values: states, reasons and timestamps are bound parameters chosen in
//!   Rust (a [`Step`](crate::task::lifecycle::Step)), never literals that decide in SQL;
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
//! `UnknownTenant`, `QuotaExceeded`, `OverQuota`, `IdempotencyConflict`, `TaskExists`, `NotQueued` and
//! `IllegalTransition` are refusals with nothing written; `UnverifiedTls`, `Tls` and
//! `InvalidUrl` are configurations that cannot work (TLS without a certificate check, a
//! certificate the settings do not trust, a URL that does not parse); the rest are bugs or
//! a broken database.
//!
//! TLS to PostgreSQL is rustls (ring) as the URL's `sslmode` and `sslrootcert` say; a
//! certificate is checked whenever TLS is asked for (`sslmode=require`, which checks
//! nothing, is refused). See docs/TLS.md.

mod attempts;
mod durability;
mod error;
mod events;
mod limits;
mod local_users;
mod logs;
mod quotas;
mod reports;
mod retention;
mod row;
mod spend;
mod tasks;
mod tenants;
mod transitions;
mod webhooks;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyConnection, AnyPool, Connection as _, Transaction};

pub use crate::cost::{Spend, SpendParts};
pub use durability::DurabilityRisk;
pub use error::{Result, StoreError};
pub use limits::SessionLimits;
// The budget types moved to `cost`; re-exported while callers still name them here.
pub use crate::cost::{Budget, BudgetAction};
pub use events::{FOLLOWED_PER_READ, TaskEvent};
pub use logs::{
    LogCursor, LogLimits, LogRecording, LogsRecorded, NewLogLine, OutputMark, StoredLogLine,
    StoredProgress,
};
pub use quotas::{ACTIVE, WaitFigures};
pub use reports::{
    Exhausted, LastHeartbeat, MAX_USAGE_REPORTS_READ, Recorded, Recording, ReportAllowance,
    ReportSummary, StoredBody, StoredReport, TERMINATION_SEQUENCE, UnreportedUsage,
};
pub use spend::{ActiveTask, GroupBy, QueueFigures, UsageGroup};
pub use tasks::{Idempotency, Inserted, ListFilter, NewTask, StatePages};
pub use tenants::Tenant;
pub use webhooks::{
    AfterAttempt, Claimed, Delivery, DeliveryAttempt, DeliveryState, KEPT_ATTEMPTS,
};

use row::millis;

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a query waits for a pooled connection (including connecting) before the
/// store reports [`StoreError::Unavailable`]: a request fails fast while the database is
/// down instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an SQLite connection waits for another writer before giving up (the error is
/// then [`StoreError::Unavailable`]).
const SQLITE_BUSY_TIMEOUT_PRAGMA: &str = "PRAGMA busy_timeout = 5000";

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

/// Refuses a PostgreSQL URL whose `sslmode` (or `PGSSLMODE`, which sqlx reads when the URL
/// names none) asks for TLS without verification: `require` checks no certificate, so it
/// only looks safe.
fn refuse_unverified_tls(url: &str) -> Result<()> {
    use std::str::FromStr as _;

    use sqlx::postgres::{PgConnectOptions, PgSslMode};

    let options =
        PgConnectOptions::from_str(url).map_err(|source| StoreError::InvalidUrl { source })?;
    match options.get_ssl_mode() {
        PgSslMode::Require => Err(StoreError::UnverifiedTls),
        PgSslMode::Disable
        | PgSslMode::Allow
        | PgSslMode::Prefer
        | PgSslMode::VerifyCa
        | PgSslMode::VerifyFull => Ok(()),
    }
}

/// The dispatcher's durable state. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Told how long each operation took.
    observer: Arc<dyn OperationObserver>,
}

/// Told of every store operation: its name, whether the database answered (a refusal
/// such as a quota or a conflict is an answer), and how long it took. The metrics
/// implement it; the store itself counts nothing.
pub trait OperationObserver: fmt::Debug + Send + Sync {
    fn operation(&self, name: &'static str, answered: bool, took: Duration);
}

/// Observes nothing: a store used without metrics (tools, tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unobserved;

impl OperationObserver for Unobserved {
    fn operation(&self, _name: &'static str, _answered: bool, _took: Duration) {}
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
    ///
    /// PostgreSQL speaks TLS as the URL's `sslmode` says (libpq's names; `prefer` when it
    /// names none): `verify-full` checks the server's certificate against the CA file of
    /// `sslrootcert` (or the Mozilla roots without it) and that it names the URL's host;
    /// `verify-ca` skips the host check; `require`, which checks nothing, is refused
    /// ([`StoreError::UnverifiedTls`]).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        Self::connect_with(url, max_connections, SessionLimits::NONE).await
    }

    /// [`Store::connect`], every PostgreSQL session under `limits` (SQLite has no such
    /// settings; its busy timeout bounds lock waits).
    pub async fn connect_with(
        url: &str,
        max_connections: u32,
        limits: SessionLimits,
    ) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let during = || format!("connecting to the {backend} database");
        let url = match backend {
            Backend::Postgres => {
                refuse_unverified_tls(url)?;
                limits.in_url(url)?
            }
            Backend::Sqlite => {
                let file = sqlite_file(url);
                if let Some(file) = &file {
                    private_file(file, true)
                        .map_err(sqlx::Error::Io)
                        .during(during)?;
                }
                let url = sqlite_url(url);
                // WAL lets readers run beside the writer. It is a property of the file,
                // so it is set once, on a connection of its own, before the pool opens.
                let mut connection = AnyConnection::connect(&url).await.during(during)?;
                sqlx::query("PRAGMA journal_mode = WAL")
                    .execute(&mut connection)
                    .await
                    .during(during)?;
                connection.close().await.during(during)?;
                // SQLite makes its journals with the database file's mode, but files made
                // before (by an older dispatcher, or with a looser umask) keep theirs.
                if let Some(file) = &file {
                    for suffix in ["-wal", "-shm", "-journal"] {
                        let mut journal = file.clone().into_os_string();
                        journal.push(suffix);
                        private_file(std::path::Path::new(&journal), false)
                            .map_err(sqlx::Error::Io)
                            .during(during)?;
                    }
                }
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
            .map_err(|source| {
                // A handshake the settings' CA or host name refuses fails as an I/O error
                // with rustls' error inside; `sqlx::Error::Tls` is a CA file it could not
                // use.
                let tls_failed = match &source {
                    sqlx::Error::Tls(_) => true,
                    sqlx::Error::Io(io) => crate::tls::rustls_cause(io).is_some(),
                    _ => false,
                };
                if tls_failed {
                    StoreError::Tls {
                        during: during(),
                        cause: source,
                    }
                } else {
                    StoreError::sqlx(during(), source)
                }
            })?;
        Ok(Self {
            pool,
            backend,
            observer: Arc::new(Unobserved),
        })
    }

    /// This store, telling `observer` of every operation.
    #[must_use]
    pub fn observed_by(mut self, observer: Arc<dyn OperationObserver>) -> Self {
        self.observer = observer;
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
        self.observer
            .operation(operation, !failed, started.elapsed());
        result
    }

    #[must_use]
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Brings the schema up to date; running it again is a no-op. On PostgreSQL it runs
    /// on a session of its own without the statement and lock timeouts: a migration may
    /// rewrite a large table, and it must not be cancelled halfway by a limit meant for
    /// requests.
    pub async fn migrate(&self) -> Result<()> {
        let migrator = self.backend.migrator();
        let failed = |source| StoreError::migrate(self.backend, source);
        match self.backend {
            Backend::Sqlite => migrator.run(&self.pool).await.map_err(failed),
            Backend::Postgres => {
                let during = || "preparing a session for the migrations".to_owned();
                let mut session = self.pool.acquire().await.during(during)?;
                sqlx::raw_sql(limits::UNLIMITED)
                    .execute(&mut *session)
                    .await
                    .during(during)?;
                let migrated = migrator.run(&mut *session).await.map_err(failed);
                // Back to the limits the session started with; a session that cannot be
                // reset is closed rather than returned to the pool without them.
                if sqlx::raw_sql(limits::AS_STARTED)
                    .execute(&mut *session)
                    .await
                    .is_err()
                {
                    session.detach();
                }
                migrated
            }
        }
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

fn now_millis() -> i64 {
    millis(jiff::Timestamp::now())
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}

/// `sqlite://PATH` with `mode=rwc` (create the file if missing) unless a mode is given.
/// The file an SQLite URL names (`sqlite://agent-bus.db`, `sqlite:///var/lib/x.db`,
/// `sqlite:x.db?mode=rwc`); `None` for an in-memory database.
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    (!path.is_empty() && !path.contains(":memory:")).then(|| std::path::PathBuf::from(path))
}

/// Makes `path` readable and writable by this process's user only (0600), creating it
/// empty first when `create` (SQLite takes an empty file as a new database). The
/// database holds the report-token key and the tenants' key hashes, and local tasks run
/// on the same machine.
fn private_file(path: &std::path::Path, create: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    if create {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

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
    use super::{Backend, sqlite_file, sqlite_url};

    #[test]
    fn the_sqlite_file_is_found_in_every_url_form() {
        for (url, file) in [
            ("sqlite://agent-bus.db", Some("agent-bus.db")),
            (
                "sqlite:///var/lib/agent-bus/state.db",
                Some("/var/lib/agent-bus/state.db"),
            ),
            ("sqlite:x.db?mode=rwc", Some("x.db")),
            ("sqlite::memory:", None),
            ("sqlite://:memory:", None),
            ("postgres://h/db", None),
        ] {
            assert_eq!(
                sqlite_file(url),
                file.map(std::path::PathBuf::from),
                "{url}"
            );
        }
    }

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
