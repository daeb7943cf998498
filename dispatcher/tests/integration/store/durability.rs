//! The databases the tests run on keep what they acknowledge, and the store says when a
//! server does not (the dispatcher warns of it at start).

use dispatcher::store::{DurabilityRisk, Store};

async fn case_the_test_database_acknowledges_only_durable_commits(store: Store) {
    let risks = store.durability_risks().await.unwrap();
    // fsync=off on the test PostgreSQL loses nothing when only processes crash, which is
    // all the crash tests do; an asynchronous commit would lose acknowledged work.
    assert!(
        !risks.contains(&DurabilityRisk::PostgresAsynchronousCommit),
        "the test PostgreSQL must commit synchronously (tests/env/up), got {risks:?}"
    );
    assert!(!risks.contains(&DurabilityRisk::SqliteNoSync), "{risks:?}");
}

both_backends!(case_the_test_database_acknowledges_only_durable_commits);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_commits_asynchronously_is_named() {
    testsupport::needs_env!(Postgres);
    testsupport::with_database(|db| async move {
        let url = format!("{}?options=-c%20synchronous_commit%3Doff", db.url);
        let store = Store::connect(&url, 1).await.unwrap();
        let risks = store.durability_risks().await.unwrap();
        assert!(
            risks.contains(&DurabilityRisk::PostgresAsynchronousCommit),
            "{risks:?}"
        );
        let said = DurabilityRisk::PostgresAsynchronousCommit.to_string();
        assert!(
            said.starts_with("synchronous_commit = off: ")
                && said.contains("acknowledges commits before they are durable"),
            "{said}"
        );
        store.close().await;
    })
    .await;
}
