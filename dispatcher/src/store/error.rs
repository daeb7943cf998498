//! The store's errors: refusals a caller can act on (quota, idempotency, illegal moves),
//! an unreachable database (retry later), and everything else (a bug or a broken database).

use sqlx::error::DatabaseError;
use sqlx::migrate::MigrateError;
use sqlx::sqlite::SqliteError;

use super::Backend;
use crate::task::{TaskId, TaskState};

/// What went wrong in the store. Messages are lowercase and name the record involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached, refused more connections, or stayed busy past
    /// the timeout: nothing was decided; try again later (the API answers 503).
    #[error("database unavailable while {during}: {source}")]
    Unavailable { during: String, source: sqlx::Error },
    /// Any other database failure: a bug or a broken database.
    #[error("database error while {during}: {source}")]
    Database { during: String, source: sqlx::Error },
    #[error("migrating the {backend} schema: {source}")]
    Migrate {
        backend: Backend,
        source: MigrateError,
    },
    #[error("unsupported database url scheme '{scheme}': expected postgres:// or sqlite://")]
    UnsupportedUrl { scheme: String },
    /// The database URL asks for TLS without checking the server's certificate.
    #[error(
        "sslmode=require encrypts without checking the database server's certificate, so \
         anyone on the way can read and change the traffic: use sslmode=verify-full (with \
         sslrootcert=/path/to/ca.pem for a private CA), or sslmode=verify-ca"
    )]
    UnverifiedTls,
    /// The TLS handshake with the database failed: its certificate is not signed by a
    /// trusted CA or does not name the host, or the CA file is unreadable. Not a passing
    /// outage: retrying will not help until the configuration or the certificate changes.
    #[error(
        "TLS to the database failed while {during}: {cause} (the server's certificate must \
         be signed by the CA file of sslrootcert, or by a public CA without it, and with \
         sslmode=verify-full name the host of the URL)"
    )]
    // `cause`, not `source`: the message holds it already, and an error chain printed
    // with its sources would say it twice.
    Tls { during: String, cause: sqlx::Error },
    /// The database URL does not parse.
    #[error("the database URL is not valid: {source}")]
    InvalidUrl { source: sqlx::Error },
    #[error("tenant '{tenant}' already exists")]
    TenantExists { tenant: String },
    #[error("the api key of new tenant '{tenant}' is already another tenant's")]
    ApiKeyInUse { tenant: String },
    #[error("tenant '{tenant}' does not exist")]
    UnknownTenant { tenant: String },
    #[error("tenant '{tenant}' already has {limit} queued tasks, its limit")]
    QuotaExceeded { tenant: String, limit: u32 },
    /// A claim its tenant's quota on running work does not admit (nothing was written):
    /// the task stays queued.
    #[error("task {task_id} waits for its tenant's quota: {source}")]
    OverQuota {
        task_id: TaskId,
        source: crate::task::quota::OverQuota,
    },
    #[error("idempotency key '{key}' was already used for a different request")]
    IdempotencyConflict { key: String },
    #[error("task {task_id} already exists")]
    TaskExists { task_id: TaskId },
    #[error("new task {task_id} is {state}; a new task must be queued")]
    NotQueued { task_id: TaskId, state: TaskState },
    #[error("task {task_id} may not move from {from} to {to}")]
    IllegalTransition {
        task_id: TaskId,
        from: TaskState,
        to: TaskState,
    },
    #[error("encoding the spec of task {task_id}: {source}")]
    EncodeSpec {
        task_id: TaskId,
        source: serde_json::Error,
    },
    /// A stored row that does not decode: written by something else, or a schema drift.
    #[error("stored {record} is unreadable: {detail}")]
    Corrupt { record: String, detail: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Classifies a database error met while doing `during`.
    pub(super) fn sqlx(during: String, source: sqlx::Error) -> Self {
        if is_unavailable(&source) {
            Self::Unavailable { during, source }
        } else {
            Self::Database { during, source }
        }
    }

    pub(super) fn migrate(backend: Backend, source: MigrateError) -> Self {
        match source {
            MigrateError::Execute(source) if is_unavailable(&source) => Self::Unavailable {
                during: format!("migrating the {backend} schema"),
                source,
            },
            source => Self::Migrate { backend, source },
        }
    }

    pub(super) fn corrupt(record: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            record: record.into(),
            detail: detail.into(),
        }
    }
}

/// Whether `error` means "the database is not reachable or not answering now", as opposed
/// to "the database answered and refused".
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database) => is_unavailable_code(database.as_ref()),
        _ => false,
    }
}

/// PostgreSQL: connection exceptions (class 08), shutdown and crash recovery (57P01..03),
/// too many connections and other resource shortages (class 53), a statement cancelled by
/// `statement_timeout` (57014) and a lock not had within `lock_timeout` (55P03): the
/// request may succeed when retried. SQLite: busy or locked
/// past the busy timeout (primary codes 5 and 6, whatever the extended code).
fn is_unavailable_code(error: &dyn DatabaseError) -> bool {
    let Some(code) = error.code() else {
        return false;
    };
    if error.try_downcast_ref::<SqliteError>().is_some() {
        return code
            .parse::<i32>()
            .is_ok_and(|extended| matches!(extended & 0xff, 5 | 6));
    }
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(&*code, "57P01" | "57P02" | "57P03" | "57014" | "55P03")
}
