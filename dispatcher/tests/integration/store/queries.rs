//! Queries over tasks: by state, next queued in dispatch order, counts by state, and a
//! closed store.

use std::time::Duration;

use dispatcher::store::{Store, StoreError};
use dispatcher::task::lifecycle::Step;
use dispatcher::task::{TaskId, TaskState, TaskSummary};

use super::support::*;

both_backends!(
    case_tasks_in_state_are_oldest_change_first,
    case_a_sweep_pages_through_more_tasks_than_a_page,
    case_next_queued_is_in_dispatch_order,
    case_count_by_state_lists_every_state,
    case_a_closed_store_is_unavailable,
    case_overdue_queued_tasks_are_those_past_their_deadline,
);

async fn case_overdue_queued_tasks_are_those_past_their_deadline(store: Store) {
    acme(&store).await;
    let now = jiff::Timestamp::now();
    let second = jiff::SignedDuration::from_secs(1);
    let overdue = task("acme")
        .with(|task| task.expires_at(now - second))
        .create(&store)
        .await;
    let sooner = task("acme")
        .with(|task| task.expires_at(now - second * 2))
        .create(&store)
        .await;
    let later = task("acme")
        .with(|task| task.expires_at(now + second * 60))
        .create(&store)
        .await;
    let forever = task("acme").create(&store).await;
    assert_eq!(forever.expires_at, None);
    assert!(later.expires_at.is_some());
    // A task no longer queued is not overdue, whatever its deadline.
    let launching = task("acme")
        .with(|task| task.expires_at(now - second))
        .create(&store)
        .await;
    walk(&store, &launching, &[TaskState::Launching]).await;

    assert_eq!(
        store.overdue_queued(now, 10).await.unwrap(),
        [sooner.id, overdue.id],
        "soonest deadline first"
    );
    assert_eq!(store.overdue_queued(now, 1).await.unwrap(), [sooner.id]);

    // A launcher's claim of an overdue task writes nothing: the sweep expires it.
    let mut claim = Step::new(TaskState::Queued, TaskState::Launching);
    claim.claimable_only = true;
    assert_eq!(
        store
            .transition(overdue.id, &claim, |_| None, &|_, _| String::new())
            .await
            .unwrap(),
        None
    );
    let claimed = store
        .transition(later.id, &claim, |_| None, &|_, _| String::new())
        .await
        .unwrap();
    assert_eq!(claimed.map(|task| task.state), Some(TaskState::Launching));
    let claimed = store
        .transition(forever.id, &claim, |_| None, &|_, _| String::new())
        .await
        .unwrap();
    assert_eq!(claimed.map(|task| task.state), Some(TaskState::Launching));
    assert_eq!(
        store.task(overdue.id).await.unwrap().unwrap().expires_at,
        overdue.expires_at,
        "the deadline is stored (in milliseconds)"
    );
}

async fn case_tasks_in_state_are_oldest_change_first(store: Store) {
    acme(&store).await;
    let mut launched = Vec::new();
    for _ in 0..3 {
        let queued = task("acme").create(&store).await;
        launched.push(walk(&store, &queued, &[TaskState::Launching]).await);
        // Timestamps are milliseconds: make every change distinct.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let still_queued = task("acme").create(&store).await;
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1);

    let stuck = store
        .tasks_in_state(TaskState::Launching, later, 10)
        .await
        .unwrap();
    assert_eq!(ids(&stuck), ids(&launched));

    let oldest_two = store
        .tasks_in_state(TaskState::Launching, later, 2)
        .await
        .unwrap();
    assert_eq!(ids(&oldest_two), ids(&launched[..2]));

    let before_the_last = store
        .tasks_in_state(TaskState::Launching, launched[2].updated_at, 10)
        .await
        .unwrap();
    assert_eq!(ids(&before_the_last), ids(&launched[..2]));

    assert_eq!(
        ids(&store
            .tasks_in_state(TaskState::Queued, later, 10)
            .await
            .unwrap()),
        [still_queued.id]
    );
}

async fn case_next_queued_is_in_dispatch_order(store: Store) {
    acme(&store).await;
    let low_old = task("acme").queue("gpu").priority(1).create(&store).await;
    let high_old = task("acme").queue("gpu").priority(10).create(&store).await;
    let low_new = task("acme").queue("gpu").priority(1).create(&store).await;
    let high_new = task("acme").queue("gpu").priority(10).create(&store).await;
    let negative = task("acme").queue("gpu").priority(-5).create(&store).await;
    task("acme").queue("cpu").priority(100).create(&store).await;
    let claimed = task("acme").queue("gpu").priority(50).create(&store).await;
    walk(&store, &claimed, &[TaskState::Launching]).await;

    let order = ids(&store.next_queued("gpu", 10).await.unwrap());
    assert_eq!(
        order,
        [
            high_old.id,
            high_new.id,
            low_old.id,
            low_new.id,
            negative.id
        ]
    );
    assert_eq!(
        ids(&store.next_queued("gpu", 2).await.unwrap()),
        [high_old.id, high_new.id]
    );
    assert!(store.next_queued("none", 10).await.unwrap().is_empty());
}

async fn case_count_by_state_lists_every_state(store: Store) {
    use TaskState::{Launching, Queued, Running};
    let empty = store.count_by_state().await.unwrap();
    assert_eq!(empty.len(), TaskState::ALL.len());
    assert!(empty.iter().all(|&(_, n)| n == 0));

    acme(&store).await;
    for _ in 0..3 {
        task("acme").create(&store).await;
    }
    let one = task("acme").create(&store).await;
    walk(&store, &one, &[Launching, Running]).await;
    let two = task("acme").create(&store).await;
    walk(&store, &two, &[Launching]).await;

    let counts = store.count_by_state().await.unwrap();
    let count = |state: TaskState| {
        counts
            .iter()
            .find(|(s, _)| *s == state)
            .map(|&(_, n)| n)
            .unwrap()
    };
    assert_eq!(count(Queued), 3);
    assert_eq!(count(Launching), 1);
    assert_eq!(count(Running), 1);
    assert_eq!(counts.iter().map(|&(_, n)| n).sum::<i64>(), 5);
    assert_eq!(
        counts.iter().map(|&(s, _)| s).collect::<Vec<_>>(),
        TaskState::ALL
    );
}

async fn case_a_closed_store_is_unavailable(store: Store) {
    store.ping().await.unwrap();
    store.close().await;
    let error = store.ping().await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("database unavailable while pinging the database"),
        "{error}"
    );
    let error = store.task(TaskId::new()).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
}

async fn case_a_sweep_pages_through_more_tasks_than_a_page(store: Store) {
    acme(&store).await;
    let mut running = Vec::new();
    for _ in 0..7 {
        let queued = task("acme").create(&store).await;
        let path = [
            TaskState::Launching,
            TaskState::Launched,
            TaskState::Running,
        ];
        running.push(walk(&store, &queued, &path).await.id);
    }
    task("acme").create(&store).await;
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1);
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut walk = store.pages_in_state(TaskState::Running, later, 3);
    while let Some(page) = walk.next().await.unwrap() {
        pages.push(page.len());
        for summary in &page {
            // Read from columns, never the spec blob, and the same as the full task says
            // (the timeout included, the one field only a sweep needs).
            let full = store.task(summary.id).await.unwrap().unwrap();
            assert_eq!(summary, &TaskSummary::from(&full));
            assert_eq!(summary.timeout_seconds, 3600);
            seen.push(summary.id);
        }
    }
    // Every running task once, in id order, three at a time; the queued one is not.
    assert_eq!(pages, [3, 3, 1]);
    running.sort();
    assert_eq!(seen, running);
}
