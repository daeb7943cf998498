//! The store against real databases: every case runs twice, on a fresh PostgreSQL
//! database (`tests/env/up postgres`, `DATABASE_URL`) and on a fresh SQLite file.
//!
//! Each case is written once as `async fn case_x(store: Store)`; `both_backends!` turns
//! the list of cases into `postgres::case_x` and `sqlite::case_x` tests. The cases are
//! grouped by concern in the submodules; each lists its own. The PostgreSQL half needs
//! the test environment (`DATABASE_URL`) and skips without it.

use std::future::Future;
use std::path::PathBuf;

use dispatcher::store::{Backend, Store};
use dispatcher::task::TaskId;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

const POOL_SIZE: u32 = 8;

pub(crate) async fn on_postgres<F, Fut>(case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    testsupport::needs_env!(Postgres);
    testsupport::with_database(|db| async move {
        let store = Store::connect(&db.url, POOL_SIZE).await.unwrap();
        assert_eq!(store.backend(), Backend::Postgres);
        store.migrate().await.unwrap();
        case(store.clone()).await;
        store.close().await;
    })
    .await;
}

/// A temporary folder, removed when dropped (also when the test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("agent-bus-store-{}", TaskId::new().simple()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) async fn on_sqlite<F, Fut>(case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = TempDir::new();
    // The file does not exist yet: connect creates it.
    let url = format!("sqlite://{}", dir.0.join("state.db").display());
    let store = Store::connect(&url, POOL_SIZE).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    store.migrate().await.unwrap();
    assert!(
        dir.0.join("state.db-wal").exists(),
        "the database runs in WAL mode"
    );
    case(store.clone()).await;
    store.close().await;
}

macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::store::on_postgres(super::$case).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::store::on_sqlite(super::$case).await;
                }
            )*
        }
    };
}

mod support;

mod allowance;
mod durability;
mod limits;
mod queries;
mod quotas;
mod retention;
mod retries;
mod submissions;
mod tasks;
mod tenants;
mod transitions;
mod webhooks;
