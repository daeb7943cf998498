//! Group commit: the moves this process asks for at the same moment share one
//! transaction ([`Store::transitions`]), so a burst of claims and launches costs one
//! commit (one fsync, one hold of each tenant's lock) instead of one per move. A move
//! that comes alone is committed alone, at once: batching adds no wait when idle.
//!
//! Invariants:
//! - a move's answer is the one its own commit would have given: each is behind a
//!   savepoint, and the caller hears it only once the batch's transaction has committed;
//! - one batch is in flight per process, so the batches of one process never wait on each
//!   other's locks (a tenant's row, a task's row), and a batch's moves are in task-id
//!   order (two moves of one task keep the order they were asked in), so batches of
//!   different processes take task rows in one order;
//! - a batch holds at most [`MAX_BATCH`] moves;
//! - the committer logs and counts each committed change itself, so a change is counted
//!   even when the caller stopped waiting for it (an HTTP request dropped);
//! - batching is never a new way to fail: a move that lost a deadlock within a batch, and
//!   every move of a batch that failed for a reason other than an unavailable database,
//!   is committed again alone, once.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use super::notify::{self, TaskRenderer};
use super::observe;
use crate::cost::Prices;
use crate::metrics::Metrics;
use crate::store::{self, Store, StoreError};
use crate::task::lifecycle::Step;
use crate::task::{Task, TaskId};

/// The most moves one transaction commits.
pub(super) const MAX_BATCH: usize = 128;
/// Moves waiting for the committer; a caller past this waits for room (backpressure).
const WAITING: usize = 4 * MAX_BATCH;

/// The process's committer, started by the first move.
#[derive(Debug, Default)]
pub(super) struct GroupCommit {
    requests: OnceLock<mpsc::Sender<Request>>,
}

/// What commits: the store, what settles and renders an ended task, and where committed
/// changes are counted.
#[derive(Debug, Clone)]
pub(super) struct Committer {
    pub store: Store,
    pub metrics: Metrics,
    pub prices: Arc<Prices>,
    pub renderer: TaskRenderer,
}

/// One move asked for, and where its answer goes.
#[derive(Debug)]
struct Request {
    id: TaskId,
    step: Step,
    reply: oneshot::Sender<store::Result<Option<Task>>>,
}

impl GroupCommit {
    /// Commits `step` of task `id` with the moves asked for at the same time, through the
    /// process's committer (made from `committer` on first use).
    pub(super) async fn commit(
        &self,
        committer: impl FnOnce() -> Committer,
        id: TaskId,
        step: Step,
    ) -> store::Result<Option<Task>> {
        let requests = self.requests.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(WAITING);
            tokio::spawn(committer().run(receiver));
            sender
        });
        let (reply, answer) = oneshot::channel();
        if requests.send(Request { id, step, reply }).await.is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

impl Committer {
    /// Commits what is waiting, a batch at a time, until every sender is gone.
    async fn run(self, mut requests: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while requests.recv_many(&mut batch, MAX_BATCH).await > 0 {
            self.commit(std::mem::take(&mut batch)).await;
        }
    }

    async fn commit(&self, mut batch: Vec<Request>) {
        if batch.len() == 1 {
            for request in batch {
                let answer = self.commit_alone(request.id, &request.step).await;
                self.answer(request, answer);
            }
            return;
        }
        // Stable: two moves of one task stay in the order asked.
        batch.sort_by_key(|request| request.id);
        let settle = |task: &Task, step: &Step| Some(self.settle(task, step));
        let render = |task: &Task, event_type, step: &Step| self.render(task, event_type, step);
        let steps: Vec<(TaskId, &Step)> = batch.iter().map(|r| (r.id, &r.step)).collect();
        let answers = self.store.transitions(&steps, &settle, &render).await;
        drop(steps);
        match answers {
            Ok(answers) => {
                for (request, answer) in batch.into_iter().zip(answers) {
                    let answer = match answer {
                        Err(error) if lost_a_deadlock(&error) => {
                            self.commit_alone(request.id, &request.step).await
                        }
                        answer => answer,
                    };
                    self.answer(request, answer);
                }
            }
            Err(error) => {
                let unavailable = matches!(error, StoreError::Unavailable { .. });
                tracing::debug!(moves = batch.len(), error = %error, "a group commit failed");
                for request in batch {
                    let answer = if unavailable {
                        // Each alone would fail the same way, after as long again.
                        Err(unavailable_again(&error))
                    } else {
                        self.commit_alone(request.id, &request.step).await
                    };
                    self.answer(request, answer);
                }
            }
        }
    }

    /// Logs and counts a committed change, and tells the caller (if it still waits).
    fn answer(&self, request: Request, answer: store::Result<Option<Task>>) {
        if let Ok(Some(task)) = &answer {
            let step = &request.step;
            observe::transition(&self.metrics, step.from, task, step.at.as_millisecond());
            if let Some(ended) = &step.ended_attempt {
                observe::attempt_ended(&self.metrics, task, ended);
            }
        }
        let _ = request.reply.send(answer);
    }

    async fn commit_alone(&self, id: TaskId, step: &Step) -> store::Result<Option<Task>> {
        let render = |task: &Task, event_type| self.render(task, event_type, step);
        self.store
            .transition(id, step, |task| Some(self.settle(task, step)), &render)
            .await
    }

    /// The compute cost of every attempt of `task`, which `step` ends, as of the step.
    fn settle(&self, task: &Task, step: &Step) -> crate::task::Breakdown {
        task.spent
            .earlier_attempts
            .plus(&self.prices.settle(task, step.at))
    }

    /// The webhook body `step` of `task` makes, if a webhook wants it.
    fn render(&self, task: &Task, event_type: &'static str, step: &Step) -> String {
        notify::body(&self.renderer, task, event_type, step.at)
    }
}

/// PostgreSQL chose this move's statement to break a deadlock between transactions
/// (40P01): alone, it goes through.
fn lost_a_deadlock(error: &StoreError) -> bool {
    let (StoreError::Database { source, .. } | StoreError::Unavailable { source, .. }) = error
    else {
        return false;
    };
    matches!(source, sqlx::Error::Database(database) if database.code().as_deref() == Some("40P01"))
}

/// The error of a batch the database was unavailable for, for each of its moves
/// (`sqlx::Error` cannot be cloned; what matters to callers is that it is unavailable).
fn unavailable_again(error: &StoreError) -> StoreError {
    StoreError::Unavailable {
        during: "committing a batch of moves".to_owned(),
        source: sqlx::Error::Io(std::io::Error::other(error.to_string())),
    }
}

/// The committer is gone (only if it panicked): say so as an unavailable store, which
/// every caller already handles by trying again later.
fn stopped() -> StoreError {
    StoreError::Unavailable {
        during: "committing a move".to_owned(),
        source: sqlx::Error::Io(std::io::Error::other("the group committer stopped")),
    }
}
