//! The one writer of task state: every move of every task goes through [`Lifecycle`],
//! which plans it with the pure state machine ([`crate::task::lifecycle`]), has the store
//! commit it (a compare-and-set with its event, in one transaction), settles the cost of
//! a task that ends ([`crate::cost`]), has the webhook delivery the change makes written
//! in the same transaction (its body rendered here, [`notify`]), and then logs and counts
//! the committed change.
//!
//! Invariants:
//! - nothing else calls [`Store::transition`], [`Store::transitions`] or
//!   [`Store::record_note`] (a test reads the source tree to keep it so);
//! - a move is planned from the state the caller saw; if the task moved meanwhile the
//!   compare-and-set writes nothing and the answer is `Ok(None)`: the caller decides
//!   again from what it reads next;
//! - a change is logged and counted only once committed, by the process that committed it.
//!
//! Who moves tasks: the API (cancel, and `running` when the runner reports its start),
//! the launcher (claim within the tenant's quota, or the note `tenant_quota`; launched,
//! rejected), the local executor (started, ended, lost at restart), the watcher (what
//! Jobs and pods show, fallbacks, lost heartbeats, notes).

mod group_commit;
mod notify;
mod observe;

pub use notify::TaskRenderer;

use std::sync::Arc;

use protocol::{Report, ReportBody, TerminationSummary, Usage};

use crate::cost::Prices;
use crate::metrics::{Metrics, ReportKind};
use crate::placement::GpuClasses;
use crate::store::{Recorded, Store, StoreError};
use crate::task::lifecycle::{Ending, IllegalMove, Move, MoveKind, NextAttempt, plan_note};
use crate::task::quota::OverQuota;
use crate::task::retry::{
    self, AttemptFailure, Current, RetryAction, RetryCount, RetryDefaults, Verdict,
};
use crate::task::{AttemptOutcome, AttemptRecord, Reason, Task, TaskId, TaskState};

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

impl Claim {
    /// The claimed task; `None` when held or gone.
    #[must_use]
    pub fn claimed(self) -> Option<Task> {
        match self {
            Self::Claimed(task) => Some(*task),
            Self::Held(_) | Self::Gone => None,
        }
    }
}

/// How many due retries one pass releases.
const RELEASE_BATCH: u32 = 500;

/// How many overdue tasks one expiry pass reads.
const EXPIRY_BATCH: u32 = 500;

/// How often a cancel retries its compare-and-set on a task that keeps moving.
const CANCEL_TRIES: usize = 10;
/// Orphaned local tasks read per page at start.
const ORPHAN_PAGE: u32 = 500;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the lifecycle needs to judge failed attempts: the operator's retry defaults, and
/// the GPU classes a retry may move to.
#[derive(Debug, Clone, Default)]
pub struct RetrySettings {
    pub defaults: RetryDefaults,
    pub gpu_classes: GpuClasses,
}

/// Moves tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    store: Store,
    metrics: Metrics,
    prices: Arc<Prices>,
    retries: Arc<RetrySettings>,
    /// Makes the `data` of webhook deliveries.
    renderer: TaskRenderer,
    /// The committer of this lifecycle and its clones (made anew when the renderer
    /// changes, as it commits with it).
    group_commit: Arc<group_commit::GroupCommit>,
}

impl Lifecycle {
    /// Moves tasks of `store`, counting into `metrics` and settling ended tasks at `prices`.
    #[must_use]
    pub fn new(store: Store, metrics: Metrics, prices: Prices) -> Self {
        Self {
            store,
            metrics,
            prices: Arc::new(prices),
            retries: Arc::new(RetrySettings::default()),
            renderer: TaskRenderer::default(),
            group_commit: Arc::default(),
        }
    }

    /// Webhook deliveries carry the task as `renderer` shows it (by default a summary;
    /// the API's view when the process serves it).
    #[must_use]
    pub fn with_task_renderer(mut self, renderer: TaskRenderer) -> Self {
        self.renderer = renderer;
        self.group_commit = Arc::default();
        self
    }

    /// Judges failed attempts with `settings` (by default [`RetrySettings::default`]).
    #[must_use]
    pub fn with_retries(mut self, settings: RetrySettings) -> Self {
        self.retries = Arc::new(settings);
        self
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
    /// written). A move that ends the attempt in progress leaves a row in the attempt
    /// list, and a failure is judged by the task's retry policy first: it may become a
    /// retry (a new attempt after a backoff) instead of the task's end.
    pub async fn apply(&self, id: TaskId, from: TaskState, step: Move) -> Result<Option<Task>> {
        if step.ends_attempt(from) {
            let Some(task) = self.store.task(id).await? else {
                return Ok(None);
            };
            if task.state != from {
                return Ok(None);
            }
            return self.end_attempt(task, step).await;
        }
        let step = step.plan(from, jiff::Timestamp::now())?;
        self.commit(id, step).await
    }

    /// Commits a planned step: the compare-and-set and the cost of a task that ends
    /// (every attempt's), with the other moves asked for at the same time
    /// ([`group_commit`]), which logs and counts it.
    async fn commit(&self, id: TaskId, step: crate::task::lifecycle::Step) -> Result<Option<Task>> {
        let committer = || group_commit::Committer {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            prices: self.prices.clone(),
            renderer: self.renderer.clone(),
        };
        Ok(self.group_commit.commit(committer, id, step).await?)
    }

    /// Ends the attempt `task` is in (as just read) with `step`: judges a failure by the
    /// retry policy, checks the budget before a retry, and records the attempt.
    async fn end_attempt(&self, task: Task, step: Move) -> Result<Option<Task>> {
        let at = jiff::Timestamp::now();
        let failure = step.failure();
        let mut record = attempt_record(&task, &step, failure.as_ref(), at, &self.prices);
        let step = match failure {
            Some(failure) => self.judge(&task, step, &failure, at, &mut record).await?,
            None => step,
        };
        let mut planned = step.plan(task.state, at)?;
        planned.expected_attempt = Some(task.attempt);
        planned.ended_attempt = Some(record);
        self.commit(task.id, planned).await
    }

    /// What follows the failed attempt of `task` that `step` records: a retry, or `step`
    /// itself (the task ends), or a failure for a spent budget.
    async fn judge(
        &self,
        task: &Task,
        step: Move,
        failure: &AttemptFailure,
        at: jiff::Timestamp,
        record: &mut AttemptRecord,
    ) -> Result<Move> {
        let settings = &self.retries;
        let policy = task.spec.retry_policy.as_ref();
        let verdict = retry::judge(
            policy,
            &settings.defaults,
            failure,
            task.spec.max_retries,
            task.retries,
        );
        record.action = Some(verdict.action());
        let (counted, mutation, by) = match verdict {
            Verdict::Fail { why, .. } => {
                record.decision = Some(format!("not retried: {why}"));
                return Ok(step);
            }
            Verdict::Retry {
                counted,
                mutation,
                by,
            } => (counted, mutation, by),
        };
        if let Some(refusal) = self.budget_refusal(task, at).await? {
            record.action = Some(RetryAction::Fail);
            record.decision = Some(format!("not retried: {refusal}"));
            let mut ending = Ending::new(TaskState::Failed)
                .reason(Reason::BudgetExhausted)
                .message(format!(
                    "attempt {} failed ({}); not retried: {refusal}",
                    task.attempt, failure.class
                ));
            ending.exit_code = failure.exit_code;
            return Ok(Move::Ended(ending));
        }
        let gpu = task.spec.resources.gpu.as_ref().map(|gpu| {
            (
                task.gpu_class.as_deref().unwrap_or(gpu.class.as_str()),
                gpu.count,
            )
        });
        // What the pod asked for: the task's memory, else its GPU class's default, so a
        // GPU task that named none still grows on an out-of-memory retry.
        let (_, memory) = settings.gpu_classes.effective_requests(
            gpu.map(|(class, _)| class),
            None,
            task.spec.resources.memory,
        );
        let current = Current {
            memory,
            gpu,
            avoided_nodes: &task.avoid_nodes,
        };
        let changes = retry::plan_changes(
            &mutation,
            failure,
            current,
            &settings.defaults,
            &settings.gpu_classes,
        );
        let retries = RetryCount {
            counted: task.retries.counted + u32::from(counted),
            ignored: task.retries.ignored + u32::from(!counted),
        };
        let wait = retry::backoff(
            policy,
            &settings.defaults,
            task.retries.counted + task.retries.ignored,
            retry::jitter_seed(task.id.0.as_bytes(), task.attempt),
        );
        let not_before = at + jiff::SignedDuration::try_from(wait).unwrap_or_default();
        let counting = if counted {
            format!("retry {} of {}", retries.counted, task.spec.max_retries)
        } else {
            "a free retry (not counted)".to_owned()
        };
        record.decision = Some(format!(
            "{counting} after {:.1}s ({by})",
            wait.as_secs_f64()
        ));
        record.changes.clone_from(&changes.notes);
        let spec = changes.memory.map(|memory| {
            let mut spec = task.spec.clone();
            spec.resources.memory = Some(memory);
            spec
        });
        let expires_at = task
            .spec
            .queue_ttl_seconds
            .map(|ttl| not_before + jiff::SignedDuration::from_secs(i64::from(ttl)));
        let next = NextAttempt {
            attempt: task.attempt + 1,
            retries,
            not_before,
            expires_at,
            spec,
            gpu_class: changes.gpu_class,
            avoid_nodes: changes.avoid_nodes,
            earlier_attempts: task.spent.earlier_attempts.plus(&record.cost),
        };
        let message = format!(
            "attempt {} failed ({}{}); attempt {} starts after {}",
            task.attempt,
            failure.class,
            failure
                .exit_code
                .map_or_else(String::new, |code| format!(", exit code {code}")),
            next.attempt,
            format_args!("{not_before:.3}")
        );
        Ok(Move::Retry {
            next: Box::new(next),
            message,
        })
    }

    /// Why `task`'s tenant may not pay for another attempt: a budget with action
    /// `refuse` that is spent.
    async fn budget_refusal(&self, task: &Task, at: jiff::Timestamp) -> Result<Option<String>> {
        let Some(tenant) = self.store.tenant(&task.tenant).await? else {
            return Ok(None);
        };
        if !tenant.budget.is_set() {
            return Ok(None);
        }
        let spend = self.spend(&task.tenant, at).await?;
        Ok(tenant
            .budget
            .refusing(&spend)
            .map(|spent| spent.describe(&task.tenant)))
    }

    /// What `tenant` has spent this UTC day and month at `now`, unfinished tasks included.
    pub async fn spend(
        &self,
        tenant: &str,
        now: jiff::Timestamp,
    ) -> std::result::Result<crate::cost::Spend, StoreError> {
        let parts = self.store.spend_parts(tenant, now).await?;
        Ok(self.prices.spend(&parts, now))
    }

    /// Releases retries whose backoff ended by `now` (a bounded batch): the caller
    /// enqueues them.
    pub async fn release_due_retries(&self, now: jiff::Timestamp) -> Result<Vec<Task>> {
        Ok(self.store.release_due_retries(now, RELEASE_BATCH).await?)
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

    /// Ends, as lost (`job_lost`), the attempt of every task that was launching, launched
    /// or running in a local process of a dispatcher that stopped: its process went with
    /// it. The retry policy decides what follows (by default a free retry).
    pub async fn end_orphaned_local_attempts(&self) {
        let now = jiff::Timestamp::now();
        for state in [
            TaskState::Launching,
            TaskState::Launched,
            TaskState::Running,
        ] {
            // Page by page: every such task, however many.
            let mut pages = self.store.pages_in_state(state, now, ORPHAN_PAGE);
            while let Ok(Some(tasks)) = pages.next().await {
                for task in tasks {
                    let lost = Move::Lost {
                        message: "the dispatcher that ran this task as a local process stopped"
                            .to_owned(),
                    };
                    if let Ok(Some(_)) = self.apply(task.id, state, lost).await {
                        tracing::warn!(task_id = %task.id, "ended the attempt of a local task orphaned by a restart");
                    }
                }
            }
        }
    }
}

/// The attempt-list row of the attempt `task` is in, ended now (`at`) by `step`.
fn attempt_record(
    task: &Task,
    step: &Move,
    failure: Option<&AttemptFailure>,
    at: jiff::Timestamp,
    prices: &Prices,
) -> AttemptRecord {
    let (outcome, reason, message, exit_code) = match step {
        Move::Ended(ending) => (
            match ending.state {
                TaskState::Succeeded => AttemptOutcome::Succeeded,
                TaskState::TimedOut => AttemptOutcome::TimedOut,
                _ => AttemptOutcome::Failed,
            },
            ending.reason,
            ending.message.clone(),
            ending.exit_code,
        ),
        Move::Cancel => (
            AttemptOutcome::Cancelled,
            Some(Reason::CancelledByUser),
            None,
            None,
        ),
        Move::FallBack { message, .. } => (
            AttemptOutcome::FellBack,
            Some(Reason::Unschedulable),
            Some(message.clone()),
            None,
        ),
        Move::LaunchRejected { message } => (
            AttemptOutcome::Failed,
            Some(Reason::LaunchRejected),
            Some(message.clone()),
            None,
        ),
        Move::Lost { message } => (
            AttemptOutcome::Failed,
            Some(Reason::JobLost),
            Some(message.clone()),
            None,
        ),
        Move::HeartbeatLost { message } => (
            AttemptOutcome::Failed,
            Some(Reason::HeartbeatLost),
            Some(message.clone()),
            None,
        ),
        Move::Retry { message, .. } => (AttemptOutcome::Failed, None, Some(message.clone()), None),
        Move::Claim | Move::Launched | Move::Started | Move::Expire { .. } => {
            (AttemptOutcome::Failed, None, None, None)
        }
    };
    AttemptRecord {
        attempt: task.attempt,
        outcome,
        reason,
        failure_class: failure.map(|failure| failure.class),
        exit_code,
        message: message.filter(|m| !m.trim().is_empty()),
        node: failure.and_then(|failure| failure.node.clone()),
        gpu_class: task.gpu_class.clone(),
        launched_at: task.timeline.launched_at,
        started_at: task.timeline.started_at,
        ended_at: at,
        cost: prices.settle(task, at),
        action: None,
        decision: None,
        changes: Vec::new(),
    }
}
