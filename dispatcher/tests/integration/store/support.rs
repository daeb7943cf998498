//! Fixtures of the store cases: new tasks built fluently, tenants, and walking a task
//! through states.

use crate::task::fixtures::TaskFixture;
use dispatcher::store::{Inserted, NewTask, Store, TaskEvent};
use dispatcher::task::lifecycle::Step;
use dispatcher::task::{Task, TaskId, TaskState};

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// A new task as the store receives it: the crate's [`TaskFixture`] (a fresh id, created
/// now) plus an optional idempotency key, built fluently:
/// `task("acme").queue("gpu").priority(5).label("team", "ml")`.
#[derive(Debug, Clone)]
pub(crate) struct NewTaskFixture {
    pub(crate) task: TaskFixture,
    pub(crate) idempotency: Option<(String, String)>,
}

pub(crate) fn task(tenant: &str) -> NewTaskFixture {
    NewTaskFixture {
        task: TaskFixture::submitted(tenant),
        idempotency: None,
    }
}

impl NewTaskFixture {
    pub(crate) fn with(mut self, change: impl FnOnce(TaskFixture) -> TaskFixture) -> Self {
        self.task = change(self.task);
        self
    }

    pub(crate) fn name(self, name: &str) -> Self {
        self.with(|task| task.name(name))
    }

    pub(crate) fn queue(self, queue: &str) -> Self {
        self.with(|task| task.queue(queue))
    }

    pub(crate) fn priority(self, priority: i32) -> Self {
        self.with(|task| task.priority(priority))
    }

    pub(crate) fn label(self, key: &str, value: &str) -> Self {
        self.with(|task| task.label(key, value))
    }

    pub(crate) fn env(self, name: &str, value: &str) -> Self {
        self.with(|task| task.env(name, value))
    }

    pub(crate) fn state(self, state: TaskState) -> Self {
        self.with(|task| task.state(state))
    }

    pub(crate) fn idempotency(mut self, key: &str, request_hash: &str) -> Self {
        self.idempotency = Some((key.into(), request_hash.into()));
        self
    }

    pub(crate) fn obj(self) -> NewTask {
        let new = NewTask::new(self.task.obj());
        match self.idempotency {
            Some((key, hash)) => new.idempotent(key, hash),
            None => new,
        }
    }

    /// Inserts it, expecting a new task.
    pub(crate) async fn create(self, store: &Store) -> Task {
        match store.insert_task(self.obj()).await.unwrap() {
            Inserted::Created(task) => task,
            Inserted::Replayed(task) => panic!("expected a new task, got a replay of {}", task.id),
        }
    }
}

/// A tenant with room for `max_queued_tasks`; its api key hash is `key-<name>`.
pub(crate) async fn tenant(store: &Store, name: &str, max_queued_tasks: u32) {
    store
        .create_tenant(name, &format!("key-{name}"), max_queued_tasks)
        .await
        .unwrap();
}

pub(crate) async fn acme(store: &Store) {
    tenant(store, "acme", 1000).await;
}

/// Moves `task` along `path` (from its current state), expecting every move to apply.
pub(crate) async fn walk(store: &Store, task: &Task, path: &[TaskState]) -> Task {
    let mut current = task.clone();
    for &to in path {
        current = store
            .transition(
                current.id,
                &Step::new(current.state, to),
                |_| None,
                &|_, _| String::new(),
            )
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} -> {to} did not apply", current.state));
    }
    current
}

pub(crate) fn ids(tasks: &[Task]) -> Vec<TaskId> {
    tasks.iter().map(|t| t.id).collect()
}

pub(crate) fn moves(events: &[TaskEvent]) -> Vec<(Option<TaskState>, TaskState)> {
    events.iter().map(|e| (e.from, e.to)).collect()
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------
