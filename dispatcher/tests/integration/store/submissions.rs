//! Idempotent submissions (replays, conflicts, one task under concurrency) and the
//! queued-task quota.

use dispatcher::store::{Inserted, ListFilter, Store, StoreError};
use dispatcher::task::{Task, TaskState};
use futures::future::join_all;

use super::support::*;

both_backends!(
    case_an_idempotent_replay_returns_the_original,
    case_a_reused_key_with_another_body_conflicts,
    case_idempotency_keys_belong_to_one_tenant,
    case_concurrent_submissions_of_one_key_store_one_task,
    case_the_quota_counts_queued_tasks,
    case_the_quota_holds_under_concurrent_submissions,
);

async fn case_an_idempotent_replay_returns_the_original(store: Store) {
    acme(&store).await;
    let original = task("acme")
        .idempotency("key-1", "hash-a")
        .create(&store)
        .await;

    let replay = task("acme")
        .name("other")
        .idempotency("key-1", "hash-a")
        .obj();
    let inserted = store.insert_task(replay).await.unwrap();
    assert!(inserted.is_replayed());
    assert_eq!(inserted.task(), &original);

    assert_eq!(
        ids(&store
            .list_tasks("acme", &ListFilter::new(10))
            .await
            .unwrap()),
        [original.id]
    );
    assert_eq!(store.events(original.id, None).await.unwrap().len(), 1);

    // The replay shows the task as it is now.
    let launching = walk(&store, &original, &[TaskState::Launching]).await;
    let replay = task("acme").idempotency("key-1", "hash-a").obj();
    assert_eq!(
        store.insert_task(replay).await.unwrap(),
        Inserted::Replayed(launching)
    );
}

async fn case_a_reused_key_with_another_body_conflicts(store: Store) {
    acme(&store).await;
    let original = task("acme")
        .idempotency("key-1", "hash-a")
        .create(&store)
        .await;

    let error = store
        .insert_task(task("acme").idempotency("key-1", "hash-b").obj())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::IdempotencyConflict { key } if key == "key-1"),
        "{error:?}"
    );
    assert_eq!(
        ids(&store
            .list_tasks("acme", &ListFilter::new(10))
            .await
            .unwrap()),
        [original.id]
    );
}

async fn case_idempotency_keys_belong_to_one_tenant(store: Store) {
    acme(&store).await;
    tenant(&store, "globex", 10).await;
    let theirs = task("acme")
        .idempotency("key-1", "hash-a")
        .create(&store)
        .await;
    let ours = task("globex")
        .idempotency("key-1", "hash-a")
        .create(&store)
        .await;
    assert_ne!(theirs.id, ours.id);
    assert_eq!(ours.tenant, "globex");
}

async fn case_concurrent_submissions_of_one_key_store_one_task(store: Store) {
    acme(&store).await;
    let submissions = (0..50).map(|_| {
        let store = store.clone();
        let new = task("acme").idempotency("same-key", "same-hash").obj();
        tokio::spawn(async move { store.insert_task(new).await })
    });
    let outcomes: Vec<Inserted> = join_all(submissions)
        .await
        .into_iter()
        .map(|joined| joined.unwrap().unwrap())
        .collect();

    let created: Vec<&Task> = outcomes
        .iter()
        .filter_map(|o| match o {
            Inserted::Created(task) => Some(task),
            Inserted::Replayed(_) => None,
        })
        .collect();
    assert_eq!(created.len(), 1, "exactly one submission creates the task");
    let winner = created[0].id;
    assert!(outcomes.iter().all(|o| o.task().id == winner));

    assert_eq!(
        ids(&store
            .list_tasks("acme", &ListFilter::new(100))
            .await
            .unwrap()),
        [winner]
    );
    assert_eq!(store.events(winner, None).await.unwrap().len(), 1);
}

async fn case_the_quota_counts_queued_tasks(store: Store) {
    tenant(&store, "small", 2).await;
    let first = task("small").idempotency("k1", "h1").create(&store).await;
    task("small").create(&store).await;

    let error = store.insert_task(task("small").obj()).await.unwrap_err();
    assert!(
        matches!(&error, StoreError::QuotaExceeded { tenant, limit: 2 } if tenant == "small"),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "tenant 'small' already has 2 queued tasks, its limit"
    );
    assert_eq!(
        store
            .list_tasks("small", &ListFilter::new(10))
            .await
            .unwrap()
            .len(),
        2
    );

    // A replay is not a new task: it is answered even at the limit.
    let replay = store
        .insert_task(task("small").idempotency("k1", "h1").obj())
        .await
        .unwrap();
    assert_eq!(replay, Inserted::Replayed(first.clone()));

    // Once a task leaves the queue, there is room again.
    let first = walk(&store, &first, &[TaskState::Launching]).await;
    let third = task("small").create(&store).await;

    // The count the check reads follows every move into and out of the queue: a task
    // back in the queue (a launch to retry) takes its place again, a cancelled one frees
    // it, and a task that ends without having been queued changes nothing.
    let first = walk(&store, &first, &[TaskState::Queued]).await;
    assert!(matches!(
        store.insert_task(task("small").obj()).await,
        Err(StoreError::QuotaExceeded { limit: 2, .. })
    ));
    walk(&store, &third, &[TaskState::Cancelled]).await;
    assert!(matches!(
        store.insert_task(task("small").obj()).await,
        Err(StoreError::QuotaExceeded { limit: 2, .. })
    ));
    walk(
        &store,
        &first,
        &[
            TaskState::Launching,
            TaskState::Launched,
            TaskState::Running,
            TaskState::Failed,
        ],
    )
    .await;
    task("small").create(&store).await;
    assert!(matches!(
        store.insert_task(task("small").obj()).await,
        Err(StoreError::QuotaExceeded { limit: 2, .. })
    ));
}

async fn case_the_quota_holds_under_concurrent_submissions(store: Store) {
    tenant(&store, "small", 5).await;
    let submissions = (0..20).map(|_| {
        let store = store.clone();
        let new = task("small").obj();
        tokio::spawn(async move { store.insert_task(new).await })
    });
    let outcomes: Vec<_> = join_all(submissions)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Inserted::Created(_))))
        .count();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Err(StoreError::QuotaExceeded { limit: 5, .. })))
        .count();
    let unexpected: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err())
        .filter(|e| !matches!(e, StoreError::QuotaExceeded { .. }))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert_eq!((created, refused), (5, 15));
    assert_eq!(
        store
            .list_tasks("small", &ListFilter::new(100))
            .await
            .unwrap()
            .len(),
        5
    );
}
