//! Migrations, tenants and budgets, inserted tasks read back whole, tenant isolation,
//! listing and its filters.

use dispatcher::store::{Budget, BudgetAction, ListFilter, Store, StoreError};
use dispatcher::task::{TaskId, TaskState, TaskSummary};

use super::support::*;

both_backends!(
    case_migrating_twice_is_a_no_op,
    case_budgets_set_and_clear_in_any_order,
    case_tenants_are_unique_by_name_and_key,
    case_inserted_tasks_read_back_whole,
    case_tasks_are_invisible_to_other_tenants,
    case_unknown_tenants_and_non_queued_tasks_are_refused,
    case_listing_pages_newest_first_without_gaps,
    case_listing_filters_by_state_queue_and_label,
    case_summaries_are_the_listed_tasks_without_their_spec,
);

async fn case_migrating_twice_is_a_no_op(store: Store) {
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
    acme(&store).await;
    task("acme").create(&store).await;
}

/// Set, cleared, set again, many times over the pool's connections: a cleared amount must
/// not break the next set one (PostgreSQL caches each statement's parameter types per
/// connection).
async fn case_budgets_set_and_clear_in_any_order(store: Store) {
    store.create_tenant("acme", "hash-1", 10).await.unwrap();
    for round in 0..(3 * super::POOL_SIZE) {
        let amount = f64::from(round);
        let budget = Budget {
            daily_dollars: (round % 2 == 1).then_some(amount),
            monthly_dollars: (round % 3 != 0).then_some(amount * 30.0),
            action: if round % 2 == 0 {
                BudgetAction::Alert
            } else {
                BudgetAction::Refuse
            },
        };
        store.set_budget("acme", &budget).await.unwrap();
        let stored = store
            .tenant_by_key_hash("hash-1")
            .await
            .unwrap()
            .unwrap()
            .budget;
        assert_eq!(stored, budget, "round {round}");
    }
    let unknown = store
        .set_budget("nobody", &Budget::default())
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, StoreError::UnknownTenant { .. }),
        "{unknown:?}"
    );
}

async fn case_tenants_are_unique_by_name_and_key(store: Store) {
    let created = store.create_tenant("acme", "hash-1", 10).await.unwrap();
    assert_eq!(created.name, "acme");
    assert_eq!(created.max_queued_tasks, 10);

    let same_name = store.create_tenant("acme", "hash-2", 10).await.unwrap_err();
    assert!(
        matches!(&same_name, StoreError::TenantExists { tenant } if tenant == "acme"),
        "{same_name:?}"
    );
    assert_eq!(same_name.to_string(), "tenant 'acme' already exists");

    let same_key = store
        .create_tenant("globex", "hash-1", 10)
        .await
        .unwrap_err();
    assert!(
        matches!(&same_key, StoreError::ApiKeyInUse { tenant } if tenant == "globex"),
        "{same_key:?}"
    );

    assert_eq!(
        store.tenant_by_key_hash("hash-1").await.unwrap(),
        Some(created)
    );
    assert_eq!(store.tenant_by_key_hash("hash-2").await.unwrap(), None);
}

async fn case_inserted_tasks_read_back_whole(store: Store) {
    acme(&store).await;
    let created = task("acme")
        .name("finetune")
        .queue("gpu")
        .priority(7)
        .label("team", "ml")
        .env("SEED", "42")
        .create(&store)
        .await;
    assert_eq!(created.state, TaskState::Queued);
    assert_eq!(created.attempt, 1);

    let stored = store.get_task("acme", created.id).await.unwrap();
    assert_eq!(stored.as_ref(), Some(&created));
    assert_eq!(store.task(created.id).await.unwrap(), Some(created.clone()));
    assert_eq!(store.task(TaskId::new()).await.unwrap(), None);

    let events = store.events(created.id, None).await.unwrap();
    assert_eq!(moves(&events), [(None, TaskState::Queued)]);
    assert_eq!(events[0].attempt, 1);
    assert_eq!(events[0].at, created.created_at);
}

async fn case_tasks_are_invisible_to_other_tenants(store: Store) {
    acme(&store).await;
    tenant(&store, "globex", 10).await;
    let mine = task("acme").label("team", "ml").create(&store).await;

    assert_eq!(store.get_task("globex", mine.id).await.unwrap(), None);
    assert!(
        store
            .list_tasks("globex", &ListFilter::new(100))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .list_tasks("globex", &ListFilter::new(100).label("team", "ml"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.get_task("acme", mine.id).await.unwrap(), Some(mine));
}

async fn case_unknown_tenants_and_non_queued_tasks_are_refused(store: Store) {
    let error = store.insert_task(task("nobody").obj()).await.unwrap_err();
    assert!(
        matches!(&error, StoreError::UnknownTenant { tenant } if tenant == "nobody"),
        "{error:?}"
    );

    acme(&store).await;
    let running = task("acme").state(TaskState::Running);
    let id = running.task.clone().obj().id;
    let error = store.insert_task(running.obj()).await.unwrap_err();
    assert!(
        matches!(error, StoreError::NotQueued { task_id, state: TaskState::Running } if task_id == id),
        "{error:?}"
    );

    let first = task("acme");
    let again = first.clone();
    first.create(&store).await;
    let error = store.insert_task(again.obj()).await.unwrap_err();
    assert!(matches!(error, StoreError::TaskExists { .. }), "{error:?}");
    assert_eq!(
        store
            .list_tasks("acme", &ListFilter::new(10))
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn case_listing_pages_newest_first_without_gaps(store: Store) {
    acme(&store).await;
    let mut created = Vec::new();
    for n in 0..7 {
        created.push(task("acme").name(&format!("t{n}")).create(&store).await.id);
    }
    let mut newest_first = created.clone();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));

    let mut seen = Vec::new();
    let mut filter = ListFilter::new(3);
    let mut pages = 0;
    loop {
        let page = store.list_tasks("acme", &filter).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        pages += 1;
        seen.extend(ids(&page));
        filter = filter.before(page[page.len() - 1].id);
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, newest_first);

    // A page read twice is the same page.
    let cursor = ListFilter::new(3).before(newest_first[2]);
    assert_eq!(
        ids(&store.list_tasks("acme", &cursor).await.unwrap()),
        newest_first[3..6]
    );
    assert_eq!(
        ids(&store.list_tasks("acme", &cursor).await.unwrap()),
        newest_first[3..6]
    );
    assert!(
        store
            .list_tasks("acme", &ListFilter::new(0))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn case_listing_filters_by_state_queue_and_label(store: Store) {
    acme(&store).await;
    let cpu_ml = task("acme")
        .queue("cpu")
        .label("team", "ml")
        .create(&store)
        .await;
    let gpu_ml = task("acme")
        .queue("gpu")
        .label("team", "ml")
        .label("tier", "gold")
        .create(&store)
        .await;
    let gpu_web = task("acme")
        .queue("gpu")
        .label("team", "web")
        .create(&store)
        .await;
    let launching = walk(&store, &gpu_web, &[TaskState::Launching]).await;

    let list = |filter: ListFilter| {
        let store = store.clone();
        async move { ids(&store.list_tasks("acme", &filter).await.unwrap()) }
    };
    assert_eq!(
        list(ListFilter::new(10).state(TaskState::Launching)).await,
        [launching.id]
    );
    assert_eq!(
        list(ListFilter::new(10).state(TaskState::Queued)).await,
        [gpu_ml.id, cpu_ml.id]
    );
    assert_eq!(
        list(ListFilter::new(10).queue("gpu")).await,
        [gpu_web.id, gpu_ml.id]
    );
    assert_eq!(
        list(ListFilter::new(10).label("team", "ml")).await,
        [gpu_ml.id, cpu_ml.id]
    );
    assert_eq!(
        list(ListFilter::new(10).label("tier", "gold")).await,
        [gpu_ml.id]
    );
    assert!(
        list(ListFilter::new(10).label("team", "ops"))
            .await
            .is_empty()
    );
    assert_eq!(
        list(
            ListFilter::new(10)
                .queue("gpu")
                .label("team", "ml")
                .state(TaskState::Queued)
        )
        .await,
        [gpu_ml.id]
    );
    assert_eq!(
        list(ListFilter::new(10).label("team", "ml").before(gpu_ml.id)).await,
        [cpu_ml.id]
    );
}

/// A summary (read from the columns kept beside the spec, never the spec) holds what the
/// whole task holds in the same fields, for every state a task can be listed in.
async fn case_summaries_are_the_listed_tasks_without_their_spec(store: Store) {
    acme(&store).await;
    let gpu = task("acme")
        .with(|task| task.gpus(2, "a100").cpu("500m").memory("1Gi"))
        .env("PAYLOAD", &"x".repeat(4096))
        .create(&store)
        .await;
    task("acme").queue("cpu").priority(3).create(&store).await;
    walk(&store, &gpu, &[TaskState::Launching, TaskState::Launched]).await;

    let filter = ListFilter::new(10);
    let whole = store.list_tasks("acme", &filter).await.unwrap();
    let summaries = store.list_task_summaries("acme", &filter).await.unwrap();
    assert_eq!(whole.len(), 2);
    assert_eq!(
        summaries,
        whole.iter().map(TaskSummary::from).collect::<Vec<_>>()
    );
    assert_eq!(
        store
            .list_task_summaries("acme", &filter.before(whole[0].id))
            .await
            .unwrap()
            .len(),
        1,
        "summaries page like tasks"
    );
}
