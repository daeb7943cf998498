//! The retention of ended tasks: only tasks in a final state that ended before the
//! cut-off go, with their events, in batches of at most the limit.

use dispatcher::store::{Store, StoreError};
use dispatcher::task::TaskState;

use super::support::{task, tenant, walk};

both_backends!(case_ended_tasks_past_the_cutoff_go_with_what_hangs_off_them);

async fn case_ended_tasks_past_the_cutoff_go_with_what_hangs_off_them(store: Store) {
    tenant(&store, "acme", 2).await;
    let mut ended = Vec::new();
    for outcome in [TaskState::Succeeded, TaskState::Failed] {
        let created = task("acme").create(&store).await;
        let path = [
            TaskState::Launching,
            TaskState::Launched,
            TaskState::Running,
            outcome,
        ];
        ended.push(walk(&store, &created, &path).await);
    }
    let running = task("acme").create(&store).await;
    let running = walk(
        &store,
        &running,
        &[
            TaskState::Launching,
            TaskState::Launched,
            TaskState::Running,
        ],
    )
    .await;
    let queued = task("acme").create(&store).await;

    // Nothing ended before an hour ago.
    let now = jiff::Timestamp::now();
    let hour_ago = now - jiff::SignedDuration::from_hours(1);
    assert_eq!(store.purge_ended_tasks(hour_ago, 100).await.unwrap(), 0);
    // With the cut-off ahead, the ended tasks go one batch at a time.
    let later = now + jiff::SignedDuration::from_mins(1);
    assert_eq!(store.purge_ended_tasks(later, 1).await.unwrap(), 1);
    assert_eq!(store.purge_ended_tasks(later, 1).await.unwrap(), 1);
    assert_eq!(store.purge_ended_tasks(later, 1).await.unwrap(), 0);
    for gone in &ended {
        assert_eq!(store.get_task("acme", gone.id).await.unwrap(), None);
        assert!(store.events(gone.id, None).await.unwrap().is_empty());
    }
    for kept in [&running, &queued] {
        assert!(store.get_task("acme", kept.id).await.unwrap().is_some());
        assert!(!store.events(kept.id, None).await.unwrap().is_empty());
    }
    // The queued-task count is the queue's: one queued, one more fits, then the quota.
    task("acme").create(&store).await;
    assert!(matches!(
        store.insert_task(task("acme").obj()).await,
        Err(StoreError::QuotaExceeded { limit: 2, .. })
    ));
}
