//! The launcher: takes queue deliveries, claims each task with a compare-and-set
//! (`queued → launching`) and hands it to the executor, which gives the attempt exactly one
//! Kubernetes Job (or one local process). Which queued task a delivery launches is a fair
//! choice across tenants within the delivered entry's priority band, and a claim only
//! takes a task its tenant's quota admits (see [`fair`]). Its reconciler repairs what crashes leave behind:
//! stored tasks the queue lost, tasks claimed but never launched, deliveries of dead
//! launchers, and tasks waiting for room in the cluster's ResourceQuota
//! ([`quota_wait`]: retried after a backoff, expired past their queue TTL).
//!
//! Invariants:
//! - a task is launched only by the launcher whose CAS moved it to `launching`, or by the
//!   reconciler once that claim is stale; both create the same Job name, so the cluster
//!   sees at most one Job per attempt;
//! - a claim never takes a tenant past its quota on running work (checked in the claim's
//!   transaction, under a lock on the tenant); a held task stays `queued` with reason
//!   `tenant_quota` and is offered again when its tenant has room;
//! - a delivery is acknowledged only after the store records the claim's outcome, so a
//!   launcher that dies mid-launch leaves the entry for another to claim.
//!
//! The path is pipelined: up to `concurrency` launches are in flight at once, each on its
//! own (a slow create holds back no other); their claims and `launched` records reach the
//! store through the lifecycle's group commit (the moves asked for together share one
//! transaction), and their deliveries are acknowledged together, in one Redis pipeline
//! per batch, by [`acknowledge`].

mod fair;
pub mod isolation;
pub mod job_spec;
pub mod kubernetes;
pub mod local;
pub mod quota_wait;
mod security_context;
pub mod stub;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};

use crate::metrics::LaunchFailure;

use crate::lifecycle::Lifecycle;
use crate::queue::{Delivery, Queue, QueueEntry};
use crate::task::lifecycle::Move;
use crate::task::{Reason, Task, TaskId, TaskState, TaskSummary};

pub use kubernetes::KubernetesExecutor;
pub use local::LocalExecutor;
pub use quota_wait::QuotaWaits;
use quota_wait::WaitStep;
pub use stub::StubExecutor;

/// What an executor made of a claimed task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchOutcome {
    /// The Job exists: record `launched`.
    Launched,
    /// The executor recorded the state itself (the local executor records `running`).
    AlreadyHandled,
    /// It can never work (forbidden, invalid, no namespace): fail the task with this message.
    Rejected(String),
    /// Worth trying again later; the task stays `launching` for the reconciler.
    Transient(String),
    /// The namespace's ResourceQuota has no room now (Kubernetes' message): the task waits
    /// in `launching` with reason `cluster_quota`, and the reconciler tries again after
    /// a backoff.
    ClusterQuota(String),
}

/// Where tasks run.
#[derive(Debug, Clone)]
// One per process: the size of the Kubernetes variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Executor {
    Kubernetes(KubernetesExecutor),
    Local(LocalExecutor),
    /// Benchmarks only (`--executor stub`).
    Stub(StubExecutor),
}

impl Executor {
    async fn launch(&self, task: &Task) -> LaunchOutcome {
        match self {
            Self::Kubernetes(executor) => executor.launch(task).await,
            Self::Local(executor) => executor.launch(task).await,
            Self::Stub(executor) => executor.launch(task).await,
        }
    }
}

/// Stops what runs for a task, on cancel.
#[derive(Debug, Clone)]
// One per process: the size of the Kubernetes variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Canceller {
    Kubernetes(KubernetesExecutor),
    Local(LocalExecutor),
    /// Benchmarks only (`--executor stub`).
    Stub(StubExecutor),
}

impl Canceller {
    pub async fn cancel(&self, task: &Task) -> Result<(), kube::Error> {
        match self {
            Self::Kubernetes(executor) => executor.delete(task).await,
            Self::Local(executor) => {
                executor.stop(task.id);
                Ok(())
            }
            Self::Stub(executor) => {
                executor.cancel(task);
                Ok(())
            }
        }
    }
}

/// The launcher role.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub lifecycle: Lifecycle,
    pub queue: Queue,
    pub executor: Executor,
    /// This launcher's name in the queue's consumer group.
    pub consumer: String,
    pub concurrency: usize,
    pub reconcile_interval: Duration,
    pub stale_after: Duration,
    /// Backoffs of the tasks waiting for room in the cluster.
    pub quota_waits: QuotaWaits,
}

/// The queue every task lands in when it names none; always consumed.
const DEFAULT_QUEUE: &str = crate::task::submission::DEFAULT_QUEUE;
/// How often a launcher looks for retries whose backoff ended.
const RELEASE_INTERVAL: Duration = Duration::from_secs(1);
/// A delivery unacknowledged this long belongs to a dead launcher.
const ABANDONED_AFTER: Duration = Duration::from_secs(30);
/// Queued tasks read per page when the reconciler looks for ones the queue lost.
const RECONCILE_PAGE: u32 = 500;
/// How long a consumer that holds no delivery stays in the group without reading: far
/// longer than any live launcher's blocking read, so only the consumers of processes
/// gone are forgotten (and one that was not makes itself again by reading).
const FORGET_CONSUMERS_AFTER: Duration = Duration::from_hours(1);
/// How often a launcher looks for such consumers (XINFO on every stream it reads).
const FORGET_CONSUMERS_EVERY: Duration = Duration::from_mins(10);
/// The most deliveries one acknowledgement names.
const ACK_BATCH: usize = 256;

impl Launcher {
    /// Runs until `shutdown` turns true: receives and launches, and reconciles every
    /// `reconcile_interval`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let permits = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let (acks, done) = mpsc::channel(ACK_BATCH);
        let acknowledging = tokio::spawn(acknowledge(self.queue.clone(), done));
        let mut queues: BTreeSet<String> = BTreeSet::from([DEFAULT_QUEUE.to_owned()]);
        let mut next_reconcile = tokio::time::Instant::now();
        let mut next_release = tokio::time::Instant::now();
        let mut next_reoffer = tokio::time::Instant::now();
        let mut next_forget = tokio::time::Instant::now() + FORGET_CONSUMERS_EVERY;
        let mut offered = std::collections::HashMap::new();
        // The walk of every queued task runs beside the launches, never before them.
        let discovered = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
        let walking = tokio::spawn(
            self.clone()
                .reconcile_queued_loop(Arc::clone(&discovered), shutdown.clone()),
        );
        tracing::info!(consumer = %self.consumer, "launcher started");
        while !*shutdown.borrow() {
            queues.append(
                &mut discovered
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            if tokio::time::Instant::now() >= next_reconcile {
                self.reconcile(&mut queues, &permits, &acks).await;
                next_reconcile = tokio::time::Instant::now() + self.reconcile_interval;
            }
            // The receive below waits at most a second, so retries start within about a
            // second of their backoff's end.
            if tokio::time::Instant::now() >= next_release {
                self.release_due_retries(&mut queues).await;
                next_release = tokio::time::Instant::now() + RELEASE_INTERVAL;
            }
            if tokio::time::Instant::now() >= next_forget {
                self.forget_idle_consumers(&queues).await;
                next_forget = tokio::time::Instant::now() + FORGET_CONSUMERS_EVERY;
            }
            if tokio::time::Instant::now() >= next_reoffer {
                self.reoffer_held(&mut offered, &mut queues).await;
                next_reoffer = tokio::time::Instant::now() + fair::REOFFER_INTERVAL;
            }
            let names: Vec<String> = queues.iter().cloned().collect();
            let batch = permits.available_permits().clamp(1, 64);
            let received = tokio::select! {
                received = self.queue.receive(&names, &self.consumer, batch, Duration::from_secs(1)) => received,
                _ = shutdown.changed() => break,
            };
            match received {
                Ok(deliveries) => {
                    for delivery in deliveries {
                        self.spawn_launch(delivery, &permits, &acks).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "queue receive failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }
        // Let launches in flight finish, so no claim is left half-done, and their
        // deliveries be acknowledged.
        let _ = permits.acquire_many(self.concurrency.max(1) as u32).await;
        drop(acks);
        let _ = acknowledging.await;
        walking.abort();
        tracing::info!("launcher stopped");
    }

    async fn spawn_launch(
        &self,
        delivery: Delivery,
        permits: &Arc<Semaphore>,
        acks: &mpsc::Sender<Delivery>,
    ) {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let launcher = self.clone();
        let acks = acks.clone();
        tokio::spawn(async move {
            launcher.claim_and_launch(&delivery).await;
            // Only if the acknowledger is gone (the launcher stops): unacknowledged, the
            // entry is delivered again, which is harmless.
            let _ = acks.send(delivery).await;
            drop(permit);
        });
    }

    /// Claims the task this delivery launches (CAS `queued → launching`, within its
    /// tenant's quota, fairly across tenants) and launches it.
    async fn claim_and_launch(&self, delivery: &Delivery) {
        let id = delivery.entry.task_id;
        match self.claim_fairly(&delivery.entry).await {
            Ok(Some(task)) => self.launch_claimed(task).await,
            // Cancelled, already claimed by another launcher, held by its quota, or gone.
            Ok(None) => {
                tracing::debug!(task_id = %id, "delivery launched nothing");
            }
            Err(error) => {
                tracing::warn!(task_id = %id, error = %error, "claim failed; the reconciler will enqueue it again");
            }
        }
    }

    /// Launches a task this launcher holds in `launching`, and records the outcome.
    async fn launch_claimed(&self, task: Task) {
        let metrics = self.lifecycle.metrics();
        let failure = |kind: LaunchFailure| metrics.tasks().launch_failed(&task.spec.queue, kind);
        let in_flight = metrics.tasks().launch_in_flight();
        let outcome = self.executor.launch(&task).await;
        drop(in_flight);
        if !matches!(outcome, LaunchOutcome::ClusterQuota(_)) {
            self.quota_waits.clear(task.id);
        }
        let step = match outcome {
            LaunchOutcome::Launched => Move::Launched,
            LaunchOutcome::Rejected(message) => {
                failure(LaunchFailure::Permanent);
                Move::LaunchRejected { message }
            }
            LaunchOutcome::ClusterQuota(message) => {
                failure(LaunchFailure::ClusterQuota);
                self.wait_for_room(&task, &message).await;
                return;
            }
            LaunchOutcome::AlreadyHandled => return,
            LaunchOutcome::Transient(message) => {
                failure(LaunchFailure::Transient);
                tracing::warn!(task_id = %task.id, message = %message, "launch failed transiently; the reconciler retries it");
                return;
            }
        };
        match self
            .lifecycle
            .apply(task.id, TaskState::Launching, step)
            .await
        {
            Ok(Some(_)) => {}
            // The watcher (or a cancel) got there first: the recorded state is newer.
            Ok(None) => tracing::debug!(task_id = %task.id, "task moved on while launching"),
            Err(error) => {
                tracing::warn!(task_id = %task.id, error = %error, "recording the launch failed; the reconciler retries it");
            }
        }
    }

    /// Enqueues the retries whose backoff ended (each released by exactly one launcher;
    /// one lost between release and enqueue is enqueued by the reconciler).
    async fn release_due_retries(&self, queues: &mut BTreeSet<String>) {
        match self
            .lifecycle
            .release_due_retries(jiff::Timestamp::now())
            .await
        {
            Ok(due) => {
                for task in due {
                    queues.insert(task.spec.queue.clone());
                    let entry = QueueEntry::of(&task);
                    match self.queue.enqueue(&entry).await {
                        Ok(()) => {
                            tracing::info!(task_id = %task.id, attempt = task.attempt, "retry's backoff ended; queued for launch");
                        }
                        Err(error) => {
                            tracing::warn!(task_id = %task.id, error = %error, "enqueueing a retry failed; the reconciler enqueues it");
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(error = %error, "releasing due retries failed"),
        }
    }

    /// Records why `task` waits (reason `cluster_quota`, Kubernetes' message), and when
    /// the reconciler creates its Job again.
    async fn wait_for_room(&self, task: &Task, refusal: &str) {
        let wait = self.quota_waits.refused(task.id, jiff::Timestamp::now());
        let message = format!("waiting for room in the namespace's ResourceQuota: {refusal}");
        match self
            .lifecycle
            .note(
                task.id,
                TaskState::Launching,
                Reason::ClusterQuota,
                &message,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(task_id = %task.id, refusals = wait.refusals, next_try = %wait.next_try, "no room in the cluster; the launch is retried later");
            }
            Err(error) => {
                tracing::warn!(task_id = %task.id, error = %error, "noting the cluster quota failed");
            }
        }
    }

    /// A task waiting for room in the cluster that was not launched within its queue
    /// TTL expires, as it would have in the queue.
    async fn expire_waiting(&self, task: &Task) {
        let step = Move::Expire {
            message: "waited for room in the cluster longer than its queue TTL".to_owned(),
        };
        match self
            .lifecycle
            .apply(task.id, TaskState::Launching, step)
            .await
        {
            Ok(Some(_)) => {
                self.quota_waits.clear(task.id);
                tracing::info!(task_id = %task.id, "task expired waiting for room in the cluster");
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(task_id = %task.id, error = %error, "expiring a waiting task failed");
            }
        }
    }

    /// Walks every queued task against the queue ([`Launcher::reconcile_queued`]) again
    /// and again, beside the launches, adding the queues it finds to `discovered`. A walk
    /// is linear in the queued tasks (a million take tens of seconds), so the pause after
    /// one is nine times as long as it took, and at least `--reconcile-interval`: at most
    /// a tenth of the time goes to walking, and launches never wait for it.
    async fn reconcile_queued_loop(
        self,
        discovered: Arc<std::sync::Mutex<BTreeSet<String>>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        while !*shutdown.borrow() {
            let started = tokio::time::Instant::now();
            let found = self.reconcile_queued().await;
            discovered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(found);
            let pause = self.reconcile_interval.max(started.elapsed() * 9);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Stored tasks the queue does not hold (a crash between commit and enqueue, a flushed
    /// Redis) are enqueued again; tasks younger than one interval are left to the API's
    /// enqueue. Every queued task, page by page, each queue's entries read once. The
    /// queues the walk met.
    async fn reconcile_queued(&self) -> BTreeSet<String> {
        let mut queues = BTreeSet::new();
        let now = jiff::Timestamp::now();
        let settled =
            now - jiff::SignedDuration::try_from(self.reconcile_interval).unwrap_or_default();
        let mut present = HashMap::new();
        let store = self.lifecycle.store();
        let mut pages = store.pages_in_state(TaskState::Queued, settled, RECONCILE_PAGE);
        loop {
            let mut waiting = match pages.next().await {
                Ok(Some(waiting)) => waiting,
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(error = %error, "reconcile: listing queued tasks failed");
                    break;
                }
            };
            queues.extend(waiting.iter().map(|t| t.queue.clone()));
            // A task still backing off is enqueued when it is released; tasks a quota
            // holds have no entry on purpose: the re-offer pass offers them when their
            // tenant has room.
            waiting.retain(|t| {
                t.next_attempt_at.is_none_or(|at| at <= now)
                    && t.reason != Some(Reason::TenantQuota)
            });
            self.enqueue_missing(&waiting, &mut present).await;
        }
        queues
    }

    /// Repairs what crashes and lost messages leave behind, besides the walk of queued
    /// tasks ([`Launcher::reconcile_queued_loop`]); each step bounded.
    async fn reconcile(
        &self,
        queues: &mut BTreeSet<String>,
        permits: &Arc<Semaphore>,
        acks: &mpsc::Sender<Delivery>,
    ) {
        let now = jiff::Timestamp::now();
        // 1. Claims whose launcher died before recording an outcome.
        let stale = now - jiff::SignedDuration::try_from(self.stale_after).unwrap_or_default();
        match self
            .lifecycle
            .store()
            .tasks_in_state(TaskState::Launching, stale, 1000)
            .await
        {
            Ok(stuck) => {
                self.quota_waits.forget_stale(now);
                for task in stuck {
                    if task.reason == Some(Reason::ClusterQuota) {
                        match self.quota_waits.step(&task, now) {
                            WaitStep::Wait => continue,
                            WaitStep::Expire => {
                                self.expire_waiting(&task).await;
                                continue;
                            }
                            WaitStep::Retry => {
                                tracing::debug!(task_id = %task.id, "trying again a launch the cluster had no room for");
                            }
                        }
                    }
                    // Every replica sees the same stale claims: one takes each.
                    match self
                        .lifecycle
                        .store()
                        .take_stale_claim(task.id, task.updated_at, now)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(error) => {
                            tracing::warn!(task_id = %task.id, error = %error, "reconcile: taking a stale claim failed");
                            continue;
                        }
                    }
                    if task.reason != Some(Reason::ClusterQuota) {
                        tracing::info!(task_id = %task.id, "relaunching a stale claim");
                    }
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let launcher = self.clone();
                    tokio::spawn(async move {
                        launcher.launch_claimed(task).await;
                        drop(permit);
                    });
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "reconcile: listing launching tasks failed");
            }
        }
        // 2. Deliveries a dead launcher took and never acknowledged.
        let names: Vec<String> = queues.iter().cloned().collect();
        match self
            .queue
            .claim_abandoned(&names, &self.consumer, ABANDONED_AFTER, 100)
            .await
        {
            Ok(deliveries) => {
                for delivery in deliveries {
                    self.spawn_launch(delivery, permits, acks).await;
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "reconcile: claiming abandoned deliveries failed");
            }
        }
    }

    /// Forgets the consumers of launchers long gone (every process is one) once they
    /// hold nothing: Redis would keep them forever.
    async fn forget_idle_consumers(&self, queues: &BTreeSet<String>) {
        let names: Vec<String> = queues.iter().cloned().collect();
        match self
            .queue
            .forget_idle_consumers(&names, &self.consumer, FORGET_CONSUMERS_AFTER)
            .await
        {
            Ok(0) => {}
            Ok(forgotten) => {
                tracing::info!(forgotten, "forgot the queue consumers of launchers gone");
            }
            Err(error) => {
                tracing::warn!(error = %error, "forgetting idle queue consumers failed");
            }
        }
    }

    /// Enqueues the tasks of `queued` their queue does not hold; `present` keeps what
    /// each queue held when first read, across the pages of one reconcile.
    async fn enqueue_missing(
        &self,
        queued: &[TaskSummary],
        present: &mut HashMap<String, HashSet<TaskId>>,
    ) {
        let mut by_queue: std::collections::BTreeMap<&str, Vec<&TaskSummary>> =
            std::collections::BTreeMap::new();
        for task in queued {
            by_queue.entry(task.queue.as_str()).or_default().push(task);
        }
        for (queue, tasks) in by_queue {
            if !present.contains_key(queue) {
                match self.queue.pending_task_ids(queue).await {
                    Ok(ids) => {
                        present.insert(queue.to_owned(), ids);
                    }
                    Err(error) => {
                        tracing::warn!(queue, error = %error, "reconcile: reading the queue failed");
                        continue;
                    }
                }
            }
            let held = present.get(queue);
            for task in tasks
                .into_iter()
                .filter(|t| held.is_none_or(|ids| !ids.contains(&t.id)))
            {
                let entry = QueueEntry {
                    task_id: task.id,
                    queue: queue.to_owned(),
                    priority: task.priority,
                };
                match self.queue.enqueue(&entry).await {
                    Ok(()) => {
                        tracing::info!(task_id = %task.id, queue, "re-enqueued a stored task the queue had lost");
                    }
                    Err(error) => {
                        tracing::warn!(task_id = %task.id, error = %error, "re-enqueue failed");
                    }
                }
            }
        }
    }
}

/// Acknowledges the deliveries of finished launches, those finished meanwhile together
/// (at most [`ACK_BATCH`] at once), until the launcher stops.
async fn acknowledge(queue: Queue, mut done: mpsc::Receiver<Delivery>) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while done.recv_many(&mut batch, ACK_BATCH).await > 0 {
        if let Err(error) = queue.ack_all(&batch).await {
            tracing::warn!(deliveries = batch.len(), error = %error, "ack failed; the entries may be delivered again (harmless)");
        }
        batch.clear();
    }
}
