//! The store against real databases: every case runs twice, on a fresh PostgreSQL
//! database (`tests/env/up postgres`, `DATABASE_URL`) and on a fresh SQLite file.
//!
//! Each case is written once as `async fn case_x(store: Store)`; `both_backends!` turns
//! the list of cases into `postgres::case_x` and `sqlite::case_x` tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use dispatcher::store::{
    Backend, Budget, BudgetAction, Inserted, ListFilter, NewTask, Store, StoreError, TaskEvent,
    Transition,
};
use dispatcher::task::{Reason, Resources, Task, TaskId, TaskSpec, TaskState};
use futures::future::join_all;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

const POOL_SIZE: u32 = 8;

async fn on_postgres<F, Fut>(case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
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

async fn on_sqlite<F, Fut>(case: F)
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
                    super::on_postgres(super::$case).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::on_sqlite(super::$case).await;
                }
            )*
        }
    };
}

both_backends!(
    case_migrating_twice_is_a_no_op,
    case_tenants_are_unique_by_name_and_key,
    case_budgets_set_and_clear_in_any_order,
    case_inserted_tasks_read_back_whole,
    case_tasks_are_invisible_to_other_tenants,
    case_unknown_tenants_and_non_queued_tasks_are_refused,
    case_listing_pages_newest_first_without_gaps,
    case_listing_filters_by_state_queue_and_label,
    case_an_idempotent_replay_returns_the_original,
    case_a_reused_key_with_another_body_conflicts,
    case_idempotency_keys_belong_to_one_tenant,
    case_concurrent_submissions_of_one_key_store_one_task,
    case_the_quota_counts_queued_tasks,
    case_the_quota_holds_under_concurrent_submissions,
    case_a_transition_writes_its_event,
    case_a_transition_from_the_wrong_state_writes_nothing,
    case_an_illegal_transition_is_refused,
    case_concurrent_claims_of_one_task_have_one_winner,
    case_a_note_records_why_a_task_waits,
    case_events_tell_the_story_in_order,
    case_tasks_in_state_are_oldest_change_first,
    case_next_queued_is_in_dispatch_order,
    case_count_by_state_lists_every_state,
    case_a_closed_store_is_unavailable,
);

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// A new task, built fluently: `task("acme").queue("gpu").priority(5).label("team", "ml")`.
#[derive(Debug, Clone)]
struct TaskFixture {
    task: Task,
    idempotency: Option<(String, String)>,
}

fn task(tenant: &str) -> TaskFixture {
    let spec = TaskSpec {
        name: "train".into(),
        image: "python:3.12".into(),
        command: vec!["python".into(), "train.py".into()],
        args: vec![],
        env: BTreeMap::new(),
        resources: Resources::default(),
        timeout_seconds: 3600,
        max_retries: 0,
        priority: 0,
        queue: "default".into(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        workload: dispatcher::task::WorkloadKind::Cpu,
        shm: None,
        volumes: Vec::new(),
        scratch: None,
    };
    TaskFixture {
        task: Task::new(tenant, spec),
        idempotency: None,
    }
}

impl TaskFixture {
    fn name(mut self, name: &str) -> Self {
        self.task.spec.name = name.into();
        self
    }

    fn queue(mut self, queue: &str) -> Self {
        self.task.spec.queue = queue.into();
        self
    }

    fn priority(mut self, priority: i32) -> Self {
        self.task.spec.priority = priority;
        self
    }

    fn label(mut self, key: &str, value: &str) -> Self {
        self.task.spec.labels.insert(key.into(), value.into());
        self
    }

    fn env(mut self, name: &str, value: &str) -> Self {
        self.task.spec.env.insert(name.into(), value.into());
        self
    }

    fn state(mut self, state: TaskState) -> Self {
        self.task.state = state;
        self
    }

    fn idempotency(mut self, key: &str, request_hash: &str) -> Self {
        self.idempotency = Some((key.into(), request_hash.into()));
        self
    }

    fn obj(self) -> NewTask {
        let new = NewTask::new(self.task);
        match self.idempotency {
            Some((key, hash)) => new.idempotent(key, hash),
            None => new,
        }
    }

    /// Inserts it, expecting a new task.
    async fn create(self, store: &Store) -> Task {
        match store.insert_task(self.obj()).await.unwrap() {
            Inserted::Created(task) => task,
            Inserted::Replayed(task) => panic!("expected a new task, got a replay of {}", task.id),
        }
    }
}

/// A tenant with room for `max_queued_tasks`; its api key hash is `key-<name>`.
async fn tenant(store: &Store, name: &str, max_queued_tasks: u32) {
    store
        .create_tenant(name, &format!("key-{name}"), max_queued_tasks)
        .await
        .unwrap();
}

async fn acme(store: &Store) {
    tenant(store, "acme", 1000).await;
}

/// Moves `task` along `path` (from its current state), expecting every move to apply.
async fn walk(store: &Store, task: &Task, path: &[TaskState]) -> Task {
    let mut current = task.clone();
    for &to in path {
        current = store
            .transition(current.id, current.state, &Transition::to(to))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} -> {to} did not apply", current.state));
    }
    current
}

fn ids(tasks: &[Task]) -> Vec<TaskId> {
    tasks.iter().map(|t| t.id).collect()
}

fn moves(events: &[TaskEvent]) -> Vec<(Option<TaskState>, TaskState)> {
    events.iter().map(|e| (e.from, e.to)).collect()
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

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
    for round in 0..(3 * POOL_SIZE) {
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
    let id = running.task.id;
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
    walk(&store, &first, &[TaskState::Launching]).await;
    task("small").create(&store).await;
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

async fn case_a_transition_writes_its_event(store: Store) {
    acme(&store).await;
    let queued = task("acme").create(&store).await;

    let launching = store
        .transition(
            queued.id,
            TaskState::Queued,
            &Transition::to(TaskState::Launching).message("claimed by launcher-0"),
        )
        .await
        .unwrap()
        .expect("the move applies");
    assert_eq!(launching.state, TaskState::Launching);
    assert_eq!(launching.message.as_deref(), Some("claimed by launcher-0"));
    assert_eq!(launching.spec, queued.spec);
    assert!(launching.updated_at >= queued.updated_at);
    assert_eq!(launching.created_at, queued.created_at);
    assert_eq!(
        store.task(queued.id).await.unwrap(),
        Some(launching.clone())
    );

    let events = store.events(queued.id, None).await.unwrap();
    assert_eq!(
        moves(&events),
        [
            (None, TaskState::Queued),
            (Some(TaskState::Queued), TaskState::Launching)
        ]
    );
    assert_eq!(events[1].message.as_deref(), Some("claimed by launcher-0"));
    assert_eq!(events[1].at, launching.updated_at);
    assert_eq!(events[1].task_id, queued.id);
}

async fn case_a_transition_from_the_wrong_state_writes_nothing(store: Store) {
    acme(&store).await;
    let queued = task("acme").create(&store).await;

    let applied = store
        .transition(
            queued.id,
            TaskState::Launching,
            &Transition::to(TaskState::Launched),
        )
        .await
        .unwrap();
    assert_eq!(applied, None);
    assert_eq!(store.task(queued.id).await.unwrap(), Some(queued.clone()));
    assert_eq!(store.events(queued.id, None).await.unwrap().len(), 1);

    let missing = store
        .transition(
            TaskId::new(),
            TaskState::Queued,
            &Transition::to(TaskState::Launching),
        )
        .await
        .unwrap();
    assert_eq!(missing, None);
}

async fn case_an_illegal_transition_is_refused(store: Store) {
    acme(&store).await;
    let queued = task("acme").create(&store).await;

    let error = store
        .transition(
            queued.id,
            TaskState::Queued,
            &Transition::to(TaskState::Succeeded),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::IllegalTransition { task_id, from: TaskState::Queued, to: TaskState::Succeeded }
                if task_id == queued.id
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!("task {} may not move from queued to succeeded", queued.id)
    );
    assert_eq!(store.task(queued.id).await.unwrap(), Some(queued.clone()));
    assert_eq!(store.events(queued.id, None).await.unwrap().len(), 1);

    let done = walk(&store, &queued, &[TaskState::Cancelled]).await;
    let error = store
        .transition(
            done.id,
            TaskState::Cancelled,
            &Transition::to(TaskState::Queued),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::IllegalTransition { .. }),
        "{error:?}"
    );
}

async fn case_concurrent_claims_of_one_task_have_one_winner(store: Store) {
    acme(&store).await;
    let queued = task("acme").create(&store).await;
    let claims = (0..20).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .transition(
                    queued.id,
                    TaskState::Queued,
                    &Transition::to(TaskState::Launching).message(format!("launcher-{n}")),
                )
                .await
        })
    });
    let won = join_all(claims)
        .await
        .into_iter()
        .filter_map(|joined| joined.unwrap().unwrap())
        .count();
    assert_eq!(won, 1);
    assert_eq!(store.events(queued.id, None).await.unwrap().len(), 2);
}

async fn case_a_note_records_why_a_task_waits(store: Store) {
    use TaskState::{Launched, Launching, Queued, Running};
    acme(&store).await;
    let queued = task("acme").create(&store).await;
    let launched = walk(&store, &queued, &[Launching, Launched]).await;
    let message = "0/9 nodes are available: 9 Insufficient nvidia.com/gpu";

    let noted = store
        .note(launched.id, Launched, Reason::Unschedulable, message)
        .await
        .unwrap()
        .expect("the note applies");
    assert_eq!(noted.state, Launched);
    assert_eq!(noted.reason, Some(Reason::Unschedulable));
    assert_eq!(noted.message.as_deref(), Some(message));
    assert_eq!(store.task(queued.id).await.unwrap(), Some(noted.clone()));

    // Noting it again changes nothing and writes no event.
    let again = store
        .note(launched.id, Launched, Reason::Unschedulable, message)
        .await
        .unwrap();
    assert_eq!(again, Some(noted.clone()));
    let events = store.events(queued.id, None).await.unwrap();
    assert_eq!(events.len(), 4);
    assert_eq!(events[3].from, Some(Launched));
    assert_eq!(events[3].to, Launched);
    assert_eq!(events[3].reason, Some(Reason::Unschedulable));

    // A task no longer in the noted state is left alone.
    assert_eq!(
        store
            .note(launched.id, Queued, Reason::Unschedulable, message)
            .await
            .unwrap(),
        None
    );

    // Once it runs, the waiting reason is gone.
    let running = walk(&store, &noted, &[Running]).await;
    assert_eq!((running.reason, running.message.as_deref()), (None, None));

    let done = walk(&store, &running, &[TaskState::Succeeded]).await;
    let error = store
        .note(
            done.id,
            TaskState::Succeeded,
            Reason::Unschedulable,
            message,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::IllegalTransition { .. }),
        "{error:?}"
    );
}

async fn case_events_tell_the_story_in_order(store: Store) {
    use TaskState::{Failed, Launched, Launching, Queued, Running};
    acme(&store).await;
    let queued = task("acme").create(&store).await;
    let id = queued.id;

    // The first attempt: its launch fails transiently and the task goes back to its queue.
    let launching = walk(&store, &queued, &[Launching]).await;
    let requeued = store
        .transition(
            id,
            Launching,
            &Transition::to(Queued)
                .message("apiserver timeout")
                .attempt(2),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(requeued.attempt, 2);
    assert_eq!(launching.attempt, 1);

    // The second attempt runs and fails with an exit code.
    let running = walk(&store, &requeued, &[Launching, Launched, Running]).await;
    assert_eq!(running.attempt, 2, "the attempt is kept when not given");
    assert_eq!(
        running.message, None,
        "a move clears the previous state's message"
    );
    let failed = store
        .transition(
            id,
            Running,
            &Transition::to(Failed)
                .reason(Reason::ExitCode)
                .message("Traceback: ZeroDivisionError")
                .exit_code(3),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.reason, Some(Reason::ExitCode));
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(store.get_task("acme", id).await.unwrap(), Some(failed));

    let events = store.events(id, None).await.unwrap();
    assert_eq!(
        moves(&events),
        [
            (None, Queued),
            (Some(Queued), Launching),
            (Some(Launching), Queued),
            (Some(Queued), Launching),
            (Some(Launching), Launched),
            (Some(Launched), Running),
            (Some(Running), Failed),
        ]
    );
    assert_eq!(
        events.iter().map(|e| e.attempt).collect::<Vec<_>>(),
        [1, 1, 2, 2, 2, 2, 2]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
    let last = &events[6];
    assert_eq!(last.reason, Some(Reason::ExitCode));
    assert_eq!(last.exit_code, Some(3));
    assert_eq!(
        last.message.as_deref(),
        Some("Traceback: ZeroDivisionError")
    );
    assert_eq!(events[2].message.as_deref(), Some("apiserver timeout"));
    assert_eq!(events[2].reason, None);

    // A cursor returns only what came after it.
    let after = store.events(id, Some(events[4].id)).await.unwrap();
    assert_eq!(after, events[5..]);
    assert!(
        store
            .events(id, Some(events[6].id))
            .await
            .unwrap()
            .is_empty()
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
