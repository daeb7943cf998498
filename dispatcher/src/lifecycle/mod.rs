//! The one writer of task state: every move of every task goes through [`Lifecycle`],
//! which plans it with the pure state machine ([`crate::task::lifecycle`]), has the store
//! commit it (a compare-and-set with its event, in one transaction), settles the cost of
//! a task that ends ([`crate::cost`]), and then logs and counts the committed change.
//!
//! Invariants:
//! - nothing else calls [`Store::transition`] or [`Store::record_note`] (a test reads the source
//!   tree to keep it so);
//! - a move is planned from the state the caller saw; if the task moved meanwhile the
//!   compare-and-set writes nothing and the answer is `Ok(None)`: the caller decides
//!   again from what it reads next;
//! - a change is logged and counted only once committed, by the process that committed it.
//!
//! Who moves tasks: the API (cancel, and `running` when the runner reports its start),
//! the launcher (claim within the tenant's quota, or the note `tenant_quota`; launched,
//! rejected), the local executor (started, ended, lost at restart), the watcher (what
//! Jobs and pods show, fallbacks, lost heartbeats, notes).

mod observe;

use std::sync::Arc;

use protocol::{Report, ReportBody, TerminationSummary, Usage};

use crate::cost::Prices;
use crate::metrics::{Metrics, ReportKind};
use crate::store::{Recorded, Store, StoreError};
use crate::task::lifecycle::{IllegalMove, Move, MoveKind, plan_note};
use crate::task::quota::OverQuota;
use crate::task::{Reason, Task, TaskId, TaskState};

/// Why a move was not made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state machine refuses the move; nothing was written.
    #[error(transparent)]
    Illegal(#[from] IllegalMove),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task kept moving while a move was retried; try again later.
    #[error("task {task_id} kept changing state")]
    Contended { task_id: TaskId },
}

/// What [`Lifecycle::cancel`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancelled {
    /// Cancelled now: its Job or process is to be stopped.
    Now(Task),
    /// It had ended already; as it ended.
    AlreadyEnded(Task),
    /// It no longer exists.
    Gone,
}

/// What [`Lifecycle::claim`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Claimed: the caller launches it.
    Claimed(Box<Task>),
    /// Its tenant's quota holds it; it stays queued, noted `tenant_quota`.
    Held(OverQuota),
    /// Another launcher took it, or it was cancelled, expired or is gone.
    Gone,
}

/// How many overdue tasks one expiry pass reads.
const EXPIRY_BATCH: u32 = 500;

/// How often a cancel retries its compare-and-set on a task that keeps moving.
const CANCEL_TRIES: usize = 10;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Moves tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    store: Store,
    metrics: Metrics,
    prices: Arc<Prices>,
}

impl Lifecycle {
    /// Moves tasks of `store`, counting into `metrics` and settling ended tasks at `prices`.
    #[must_use]
    pub fn new(store: Store, metrics: Metrics, prices: Prices) -> Self {
        Self {
            store,
            metrics,
            prices: Arc::new(prices),
        }
    }

    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    #[must_use]
    pub fn prices(&self) -> &Prices {
        &self.prices
    }

    /// Makes `step` of task `id`, which the caller saw in `from`. `Ok(Some(task))` with
    /// the task as moved; `Ok(None)` when it is gone or no longer in `from` (nothing
    /// written).
    pub async fn apply(&self, id: TaskId, from: TaskState, step: Move) -> Result<Option<Task>> {
        let step = step.plan(from, jiff::Timestamp::now())?;
        let at = step.at;
        let prices = &self.prices;
        let moved = self
            .store
            .transition(id, &step, |task| Some(prices.settle(task, at)))
            .await?;
        if let Some(task) = &moved {
            observe::transition(&self.metrics, from, task, at.as_millisecond());
        }
        Ok(moved)
    }

    /// A launcher takes queued task `id` (`queued → launching`) if its tenant's quota
    /// admits it. A task over quota stays queued with the note `tenant_quota` saying which
    /// limit holds it ([`Claim::Held`]); the launcher offers it again when its tenant has
    /// room.
    pub async fn claim(&self, id: TaskId) -> Result<Claim> {
        match self.apply(id, TaskState::Queued, Move::Claim).await {
            Ok(Some(task)) => Ok(Claim::Claimed(Box::new(task))),
            Ok(None) => Ok(Claim::Gone),
            Err(Error::Store(StoreError::OverQuota { task_id, source })) => {
                let message = source.to_string();
                let noted = self
                    .note(task_id, TaskState::Queued, Reason::TenantQuota, &message)
                    .await?;
                if noted.is_some() {
                    tracing::debug!(task_id = %task_id, message = %message, "task held by its tenant's quota");
                }
                Ok(Claim::Held(source))
            }
            Err(error) => Err(error),
        }
    }

    /// Cancels `task` whatever it is doing, unless it has ended. The task may move between
    /// the read and the write (the watcher records progress); every move ends in a
    /// terminal state after finitely many steps, so the compare-and-set is retried from
    /// the state read anew, a bounded number of times.
    pub async fn cancel(&self, mut task: Task) -> Result<Cancelled> {
        for _ in 0..CANCEL_TRIES {
            if task.state.is_terminal() {
                return Ok(Cancelled::AlreadyEnded(task));
            }
            if let Some(cancelled) = self.apply(task.id, task.state, Move::Cancel).await? {
                return Ok(Cancelled::Now(cancelled));
            }
            let Some(current) = self.store.task(task.id).await? else {
                return Ok(Cancelled::Gone);
            };
            task = current;
        }
        Err(Error::Contended { task_id: task.id })
    }

    /// The runner of `task`'s current attempt reported that it started: the task runs,
    /// unless it was already seen running or has moved on.
    pub async fn runner_started(&self, task: &Task) -> Result<Option<Task>> {
        if !MoveKind::Started.sources().contains(&task.state) {
            return Ok(None);
        }
        let moved = self.apply(task.id, task.state, Move::Started).await?;
        if moved.is_some() {
            tracing::info!(task_id = %task.id, attempt = task.attempt, "runner started; task running");
        }
        Ok(moved)
    }

    /// Records why `task` waits in `state`, without moving it (see [`Store::record_note`]).
    pub async fn note(
        &self,
        id: TaskId,
        state: TaskState,
        reason: Reason,
        message: &str,
    ) -> Result<Option<Task>> {
        let note = plan_note(state, reason, message, jiff::Timestamp::now())?;
        Ok(self.store.record_note(id, &note).await?)
    }

    /// Keeps the runner's termination summary of `attempt` (read from the pod status or
    /// the local termination log) before its outcome is recorded, and counts the LLM
    /// usage it brought that no usage report had.
    pub async fn record_termination(
        &self,
        id: TaskId,
        attempt: u32,
        summary: &TerminationSummary,
    ) -> Result<()> {
        if let Some(unreported) = self.store.record_termination(id, attempt, summary).await? {
            let usage: Vec<&Usage> = unreported.usage.iter().collect();
            observe::reports(&self.metrics, &unreported.task, [], &usage);
        }
        Ok(())
    }

    /// Counts what the batch of runner `reports` that made `recorded` brought new.
    pub fn reports_recorded(&self, recorded: &Recorded, reports: &[Report]) {
        let new: Vec<&ReportBody> = recorded
            .new
            .iter()
            .filter_map(|&position| reports.get(position).map(|report| &report.body))
            .collect();
        let usage: Vec<&Usage> = new
            .iter()
            .filter_map(|body| match body {
                ReportBody::Usage(usage) => Some(usage),
                _ => None,
            })
            .collect();
        observe::reports(
            &self.metrics,
            &recorded.task,
            new.into_iter().map(ReportKind::of),
            &usage,
        );
    }

    /// Expires every queued task whose queue TTL ran out by `now` (a bounded batch per
    /// call); returns how many this call expired. Any process may run it: the
    /// compare-and-set lets one win per task.
    pub async fn expire_overdue(&self, now: jiff::Timestamp) -> Result<usize> {
        let mut expired = 0;
        for id in self.store.overdue_queued(now, EXPIRY_BATCH).await? {
            let step = Move::Expire {
                message: "waited in its queue longer than its queue TTL".to_owned(),
            };
            if self.apply(id, TaskState::Queued, step).await?.is_some() {
                tracing::info!(task_id = %id, "task expired in its queue");
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Runs [`Lifecycle::expire_overdue`] every `every` until `shutdown` turns true: every
    /// role runs it, so tasks expire even where no launcher runs.
    pub async fn run_expiry(
        self,
        every: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        while !*shutdown.borrow() {
            match self.expire_overdue(jiff::Timestamp::now()).await {
                // A full batch: more may be due, go on at once.
                Ok(count) if count == EXPIRY_BATCH as usize => continue,
                Ok(_) => {}
                Err(error) => tracing::warn!(error = %error, "expiring queued tasks failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Fails every task that was launching, launched or running in a local process of a
    /// dispatcher that stopped: its process went with it.
    pub async fn fail_orphaned_local_tasks(&self) {
        let now = jiff::Timestamp::now();
        for state in [
            TaskState::Launching,
            TaskState::Launched,
            TaskState::Running,
        ] {
            let Ok(tasks) = self.store.tasks_in_state(state, now, 100_000).await else {
                continue;
            };
            for task in tasks {
                let lost = Move::Lost {
                    message: "the dispatcher that ran this task as a local process stopped"
                        .to_owned(),
                };
                if let Ok(Some(_)) = self.apply(task.id, state, lost).await {
                    tracing::warn!(task_id = %task.id, "failed a local task orphaned by a restart");
                }
            }
        }
    }
}
