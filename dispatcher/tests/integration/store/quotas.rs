//! Tenant quotas and the fair choice: a quota read, replaced and cleared; claims refused
//! over the running and GPU quotas (also when launchers claim concurrently); tenants
//! rotated by their last claim; held tasks offered again once there is room; a queued
//! task's position and the recent launches.

use dispatcher::store::{Store, StoreError};
use dispatcher::task::lifecycle::{PlannedNote, Step};
use dispatcher::task::quota::{OverQuota, TenantQuota, band, fair_order};
use dispatcher::task::{Reason, Task, TaskState};

use super::support::*;

both_backends!(
    case_a_quota_is_read_replaced_and_cleared,
    case_a_claim_beyond_the_running_quota_waits,
    case_a_group_commit_answers_each_move_as_alone,
    case_concurrent_claims_never_exceed_the_quota,
    case_a_gpu_quota_counts_the_gpus_of_its_class,
    case_tenants_take_turns_by_their_last_claim,
    case_held_tasks_come_back_when_their_tenant_has_room,
    case_a_queued_task_knows_its_position,
);

fn quota(max_running: Option<u32>, gpus: &[(&str, u32)]) -> TenantQuota {
    TenantQuota {
        max_running,
        max_gpus: gpus.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect(),
    }
}

/// The launcher's claim: queued → launching, within the queue TTL and the quota.
fn claim() -> Step {
    let mut step = Step::new(TaskState::Queued, TaskState::Launching);
    step.claimable_only = true;
    step.within_quota = true;
    step
}

async fn claim_of(store: &Store, task: &Task) -> Result<Option<Task>, StoreError> {
    store
        .transition(task.id, &claim(), |_| None, &|_, _| String::new())
        .await
}

async fn hold(store: &Store, task: &Task) {
    store
        .record_note(
            task.id,
            &PlannedNote {
                state: TaskState::Queued,
                reason: Reason::TenantQuota,
                message: "held".into(),
                at: jiff::Timestamp::now(),
            },
        )
        .await
        .unwrap()
        .unwrap();
}

async fn case_a_quota_is_read_replaced_and_cleared(store: Store) {
    acme(&store).await;
    assert_eq!(
        store.tenant_quota("acme").await.unwrap(),
        TenantQuota::default()
    );
    assert!(matches!(
        store.tenant_quota("nobody").await,
        Err(StoreError::UnknownTenant { .. })
    ));
    assert!(matches!(
        store.set_tenant_quota("nobody", &quota(Some(1), &[])).await,
        Err(StoreError::UnknownTenant { .. })
    ));
    let set = quota(Some(2), &[("a100", 4), ("h100", 2)]);
    store.set_tenant_quota("acme", &set).await.unwrap();
    assert_eq!(store.tenant_quota("acme").await.unwrap(), set);
    let replaced = quota(None, &[("h100", 1)]);
    store.set_tenant_quota("acme", &replaced).await.unwrap();
    assert_eq!(store.tenant_quota("acme").await.unwrap(), replaced);
    store
        .set_tenant_quota("acme", &TenantQuota::default())
        .await
        .unwrap();
    assert_eq!(
        store.tenant_quota("acme").await.unwrap(),
        TenantQuota::default()
    );
}

async fn case_a_claim_beyond_the_running_quota_waits(store: Store) {
    acme(&store).await;
    store
        .set_tenant_quota("acme", &quota(Some(1), &[]))
        .await
        .unwrap();
    let first = task("acme").create(&store).await;
    let second = task("acme").create(&store).await;
    assert!(claim_of(&store, &first).await.unwrap().is_some());
    match claim_of(&store, &second).await {
        Err(StoreError::OverQuota {
            task_id,
            source: OverQuota::Running {
                running: 1, max: 1, ..
            },
        }) => assert_eq!(task_id, second.id),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.task(second.id).await.unwrap().unwrap().state,
        TaskState::Queued,
        "nothing was written"
    );
    // Another tenant, without a quota, is not held back.
    let other = tenant_task(&store, "other").await;
    assert!(claim_of(&store, &other).await.unwrap().is_some());
    // The first ends: the second fits.
    let first = store.task(first.id).await.unwrap().unwrap();
    walk(&store, &first, &[TaskState::Running, TaskState::Succeeded]).await;
    assert!(claim_of(&store, &second).await.unwrap().is_some());
    // A task no longer queued is not claimed, quota or not.
    assert_eq!(claim_of(&store, &second).await.unwrap(), None);
}

async fn tenant_task(store: &Store, name: &str) -> Task {
    tenant(store, name, 1000).await;
    task(name).create(store).await
}

/// One transaction, five moves: each answered as its own commit would be, and only the
/// moves that applied are written (a refused one leaves nothing, not even its event).
async fn case_a_group_commit_answers_each_move_as_alone(store: Store) {
    acme(&store).await;
    store
        .set_tenant_quota("acme", &quota(Some(1), &[]))
        .await
        .unwrap();
    let first = task("acme").create(&store).await;
    let second = task("acme").create(&store).await;
    let other = tenant_task(&store, "other").await;
    let claimed_elsewhere = task("acme").create(&store).await;
    let launched = Step::new(TaskState::Launching, TaskState::Launched);
    let illegal = Step::new(TaskState::Queued, TaskState::Succeeded);
    let (claim_step, wrong_state) = (claim(), launched.clone());
    let batch = [
        (first.id, &claim_step),
        // Over the quota once `first` is claimed, in the same transaction.
        (second.id, &claim_step),
        (claimed_elsewhere.id, &wrong_state),
        (claimed_elsewhere.id, &illegal),
        (other.id, &claim_step),
    ];
    let answers = store
        .transitions(&batch, &|_, _| None, &|_, _, _| String::new())
        .await
        .unwrap();
    assert_eq!(answers.len(), 5);
    let mut answers = answers.into_iter();
    let claimed = answers.next().unwrap().unwrap().expect("first claimed");
    assert_eq!(
        (claimed.id, claimed.state),
        (first.id, TaskState::Launching)
    );
    assert!(matches!(
        answers.next().unwrap(),
        Err(StoreError::OverQuota { task_id, source: OverQuota::Running { running: 1, max: 1, .. } })
            if task_id == second.id
    ));
    assert_eq!(answers.next().unwrap().unwrap(), None, "not in its state");
    assert!(matches!(
        answers.next().unwrap(),
        Err(StoreError::IllegalTransition { .. })
    ));
    let claimed = answers.next().unwrap().unwrap().expect("other claimed");
    assert_eq!(claimed.id, other.id);

    for (task, state, events) in [
        (&first, TaskState::Launching, 2),
        (&second, TaskState::Queued, 1),
        (&claimed_elsewhere, TaskState::Queued, 1),
        (&other, TaskState::Launching, 2),
    ] {
        assert_eq!(store.task(task.id).await.unwrap().unwrap().state, state);
        assert_eq!(store.events(task.id, None).await.unwrap().len(), events);
    }
}

async fn case_concurrent_claims_never_exceed_the_quota(store: Store) {
    acme(&store).await;
    store
        .set_tenant_quota("acme", &quota(Some(3), &[]))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        tasks.push(task("acme").create(&store).await);
    }
    let claims = tasks.iter().map(|task| {
        let store = store.clone();
        let task = task.clone();
        tokio::spawn(async move { claim_of(&store, &task).await })
    });
    let mut claimed = 0;
    let mut held = 0;
    for result in futures::future::join_all(claims).await {
        match result.unwrap() {
            Ok(Some(_)) => claimed += 1,
            Err(StoreError::OverQuota { .. }) => held += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((claimed, held), (3, 9));
    let active = store
        .count_by_state()
        .await
        .unwrap()
        .into_iter()
        .find(|(state, _)| *state == TaskState::Launching)
        .unwrap()
        .1;
    assert_eq!(active, 3);
}

async fn case_a_gpu_quota_counts_the_gpus_of_its_class(store: Store) {
    acme(&store).await;
    store
        .set_tenant_quota("acme", &quota(None, &[("a100", 4)]))
        .await
        .unwrap();
    let two = task("acme")
        .with(|t| t.gpus(2, "a100"))
        .create(&store)
        .await;
    let three = task("acme")
        .with(|t| t.gpus(3, "a100"))
        .create(&store)
        .await;
    let h100 = task("acme")
        .with(|t| t.gpus(8, "h100"))
        .create(&store)
        .await;
    let cpu = task("acme").create(&store).await;
    let also_two = task("acme")
        .with(|t| t.gpus(2, "a100"))
        .create(&store)
        .await;
    assert!(claim_of(&store, &two).await.unwrap().is_some());
    match claim_of(&store, &three).await {
        Err(StoreError::OverQuota {
            source:
                OverQuota::Gpus {
                    held: 2,
                    asked: 3,
                    max: 4,
                    ..
                },
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(
        claim_of(&store, &h100).await.unwrap().is_some(),
        "no h100 limit"
    );
    assert!(
        claim_of(&store, &cpu).await.unwrap().is_some(),
        "no running limit"
    );
    assert!(
        claim_of(&store, &also_two).await.unwrap().is_some(),
        "2 + 2 fits 4"
    );
}

async fn case_tenants_take_turns_by_their_last_claim(store: Store) {
    tenant(&store, "a", 1000).await;
    tenant(&store, "b", 1000).await;
    tenant(&store, "idle", 1000).await;
    let mut backlog = Vec::new();
    for _ in 0..5 {
        backlog.push(task("a").create(&store).await);
    }
    let single = task("b").create(&store).await;
    let urgent = task("b").priority(5).create(&store).await;
    let normal = band(0);
    let order = |candidates: &[dispatcher::task::quota::Candidate]| {
        fair_order(candidates)
            .iter()
            .map(|c| (c.tenant.clone(), c.head))
            .collect::<Vec<_>>()
    };

    // Neither was ever claimed: the oldest head goes first; the idle tenant is absent and
    // b's urgent task is in another band.
    let candidates = store.fair_candidates("default", normal).await.unwrap();
    assert_eq!(
        order(&candidates),
        [("a".to_owned(), backlog[0].id), ("b".to_owned(), single.id)]
    );
    assert_eq!(
        order(&store.fair_candidates("default", band(5)).await.unwrap()),
        [("b".to_owned(), urgent.id)]
    );
    // a was claimed last: b's single task is next, ahead of a's backlog.
    claim_of(&store, &backlog[0]).await.unwrap().unwrap();
    let candidates = store.fair_candidates("default", normal).await.unwrap();
    assert_eq!(
        order(&candidates),
        [("b".to_owned(), single.id), ("a".to_owned(), backlog[1].id)]
    );
    claim_of(&store, &single).await.unwrap().unwrap();
    assert_eq!(
        order(&store.fair_candidates("default", normal).await.unwrap()),
        [("a".to_owned(), backlog[1].id)]
    );
    // At its running quota, a is not served.
    store
        .set_tenant_quota("a", &quota(Some(1), &[]))
        .await
        .unwrap();
    let candidates = store.fair_candidates("default", normal).await.unwrap();
    assert!(candidates.iter().any(|c| c.tenant == "a" && c.at_quota));
    assert!(order(&candidates).is_empty());
}

async fn case_held_tasks_come_back_when_their_tenant_has_room(store: Store) {
    acme(&store).await;
    store
        .set_tenant_quota("acme", &quota(Some(1), &[]))
        .await
        .unwrap();
    let running = task("acme").create(&store).await;
    let first = task("acme").create(&store).await;
    let second = task("acme").create(&store).await;
    let running = walk(
        &store,
        &running,
        &[TaskState::Launching, TaskState::Running],
    )
    .await;
    hold(&store, &first).await;
    hold(&store, &second).await;
    assert!(store.held_with_room().await.unwrap().is_empty(), "no room");
    assert_eq!(
        store.waiting_on_quota().await.unwrap(),
        [("acme".to_owned(), 2)]
    );
    walk(&store, &running, &[TaskState::Succeeded]).await;
    // One slot free: the oldest held task comes back.
    assert_eq!(ids(&store.held_with_room().await.unwrap()), [first.id]);
    // Without a limit, every held task fits.
    store
        .set_tenant_quota("acme", &TenantQuota::default())
        .await
        .unwrap();
    assert_eq!(
        ids(&store.held_with_room().await.unwrap()),
        [first.id, second.id]
    );

    // A GPU quota: a held a100 task comes back only once the a100 GPUs are released; a
    // CPU task held meanwhile fits at once.
    for task in [&first, &second] {
        store
            .transition(
                task.id,
                &Step::new(TaskState::Queued, TaskState::Cancelled),
                |_| None,
                &|_, _| String::new(),
            )
            .await
            .unwrap()
            .unwrap();
    }
    store
        .set_tenant_quota("acme", &quota(None, &[("a100", 2)]))
        .await
        .unwrap();
    let holding = task("acme")
        .with(|t| t.gpus(2, "a100"))
        .create(&store)
        .await;
    let holding = walk(
        &store,
        &holding,
        &[TaskState::Launching, TaskState::Running],
    )
    .await;
    let waiting = task("acme")
        .with(|t| t.gpus(1, "a100"))
        .create(&store)
        .await;
    let cpu = task("acme").create(&store).await;
    hold(&store, &waiting).await;
    hold(&store, &cpu).await;
    assert_eq!(ids(&store.held_with_room().await.unwrap()), [cpu.id]);
    walk(&store, &holding, &[TaskState::Succeeded]).await;
    assert_eq!(
        ids(&store.held_with_room().await.unwrap()),
        [waiting.id, cpu.id]
    );
}

async fn case_a_queued_task_knows_its_position(store: Store) {
    tenant(&store, "a", 1000).await;
    tenant(&store, "b", 1000).await;
    let a: Vec<Task> = {
        let mut tasks = Vec::new();
        for _ in 0..3 {
            tasks.push(task("a").create(&store).await);
        }
        tasks
    };
    let b1 = task("b").create(&store).await;
    let _b2 = task("b").create(&store).await;
    let _high = task("b").priority(3).create(&store).await;
    let _elsewhere = task("a").queue("gpu").create(&store).await;
    let since = jiff::Timestamp::now() - jiff::SignedDuration::from_mins(10);

    let figures = store.wait_figures(&a[0], since).await.unwrap();
    // The high band first, then one round: a[0] ahead of b1 by age is not counted for
    // b, so at most one of b's per round comes first.
    assert_eq!(figures.position.higher_bands, 1);
    assert_eq!(figures.position.own_before, 0);
    assert_eq!(figures.position.others, 1);
    assert_eq!(figures.position.position(), 3);
    assert_eq!(figures.launched_since, 0);
    // a's third task: two of its own, and b's two (b has only two).
    let figures = store.wait_figures(&a[2], since).await.unwrap();
    assert_eq!(figures.position.position(), 1 + 1 + 2 + 2);
    // b's first: one of a's per round, one round.
    assert_eq!(
        store
            .wait_figures(&b1, since)
            .await
            .unwrap()
            .position
            .position(),
        3
    );

    // A launch in the window counts towards the rate.
    walk(&store, &a[0], &[TaskState::Launching, TaskState::Launched]).await;
    let figures = store.wait_figures(&a[1], since).await.unwrap();
    assert_eq!(figures.launched_since, 1);
    // The high band, and one of b's: a[1] is a's first queued task now.
    assert_eq!(figures.position.own_before, 0);
    assert_eq!(figures.position.position(), 3);
}
