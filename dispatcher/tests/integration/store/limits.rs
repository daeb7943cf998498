//! PostgreSQL sessions under statement and lock timeouts: a statement stuck behind a lock
//! gives up in time with an error the API answers 503 (it can be retried), and the
//! migrations, which may rewrite large tables, are not cut short by them.

use std::time::Duration;

use dispatcher::store::{SessionLimits, Store, StoreError};
use sqlx::Connection as _;

use super::support::{acme, task};

const TIGHT: SessionLimits = SessionLimits {
    statement_timeout: Duration::from_millis(1),
    lock_timeout: Duration::from_millis(200),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_waiting_on_a_lock_gives_up_with_a_retryable_error() {
    testsupport::needs_env!(Postgres);
    testsupport::with_database(|db| async move {
        // A 1 ms statement limit would cancel any migration: they run without it.
        let store = Store::connect_with(&db.url, 2, TIGHT).await.unwrap();
        store.migrate().await.unwrap();
        let store = {
            store.close().await;
            let limits = SessionLimits {
                statement_timeout: Duration::from_secs(30),
                ..TIGHT
            };
            Store::connect_with(&db.url, 2, limits).await.unwrap()
        };
        acme(&store).await;

        // Another session holds the tenant's row, which a submit locks to check the quota.
        let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::raw_sql("BEGIN; SELECT 1 FROM tenants WHERE name = 'acme' FOR UPDATE")
            .execute(&mut holder)
            .await
            .unwrap();
        // Without the lock timeout the submit would wait for as long as the lock is held.
        let refused = tokio::time::timeout(
            Duration::from_mins(1),
            store.insert_task(task("acme").obj()),
        )
        .await
        .expect("the submit waited on the lock past its timeout")
        .unwrap_err();
        assert!(
            matches!(refused, StoreError::Unavailable { .. }),
            "a lock timeout can be retried: {refused:?}"
        );

        // Once the lock is released the same submit goes through.
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut holder)
            .await
            .unwrap();
        task("acme").create(&store).await;
        store.close().await;
    })
    .await;
}
