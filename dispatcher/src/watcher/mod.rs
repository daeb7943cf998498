//! The watcher: follows the Jobs and Pods of agent-bus (by label) and records every
//! change of a task's state. The stream plumbing stays thin; [`decide`] says what a
//! task's Job and pods mean, and the lifecycle ([`crate::lifecycle`]) makes the move.
//!
//! Invariants:
//! - only the leader (a `coordination.k8s.io` Lease) writes, so replicas never race;
//! - after a start or a lost watch, the initial list replays every Job and pod, and a
//!   periodic sweep compares every launched or running task with the cluster, so nothing
//!   that happened while the watcher was away is missed (a Job deleted in the meantime
//!   fails its task with `job_lost`);
//! - a task moves to a fallback GPU class by a compare-and-set to `queued` with the next
//!   attempt number first; the old attempt's Job is deleted afterwards, and the sweep
//!   deletes any Job of an attempt that is no longer its task's current one, so a crash
//!   in between leaves no second pod running;
//! - no stranded Jobs: once a task's outcome is recorded its Job is deleted (at once, or
//!   after `--keep-finished-jobs`), and every sweep deletes the Jobs of ended tasks and
//!   superseded attempts that still exist ([`cleanup`] decides, from the cluster and the
//!   store only), so a failed delete or a kill -9 is repaired by the next sweep;
//! - a launched task whose pods Kubernetes refuses to create (`FailedCreate` events of
//!   its Job) shows why within one sweep: `cluster_quota` while the namespace's
//!   ResourceQuota is full (the Job controller creates the pod once there is room), or
//!   it fails (`launch_rejected`) when a LimitRange or Pod Security refuses it for good;
//! - the sweep flags running tasks whose runner fell silent (`heartbeat_lost`), and fails
//!   them when configured to;
//! - the work grows with the active tasks, not with history or the cluster: the sweep
//!   reads them a page at a time with a cursor (no cap leaves any unswept), and a task's
//!   pods are found through an index by task attempt ([`pods`]), not a scan of every pod;
//!   it decides from task summaries (columns beside the spec, [`TaskSummary`]), never
//!   reading a spec blob, which can be a mebibyte per task.

pub mod cleanup;
pub mod decide;
pub mod lease;
mod pods;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::metrics::{JobDeletion, WatchedObject};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::ListParams;
use kube::runtime::reflector::{self, Store as Cache};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};

use crate::launcher::KubernetesExecutor;
use crate::launcher::job_spec::{LABEL_MANAGED_BY, LABEL_TASK_ID, MANAGED_BY, job_name};
use crate::lifecycle::Lifecycle;
use crate::placement::GpuClasses;
use crate::queue::{Queue, QueueEntry};
use crate::task::lifecycle::Move;
use crate::task::{Reason, TaskId, TaskState, TaskSummary};
use pods::TaskPods;

pub use decide::{Decision, Fallback, decide};

/// The watcher role.
#[derive(Clone)]
pub struct Watcher {
    pub lifecycle: Lifecycle,
    pub client: Client,
    pub namespace: String,
    pub executor: KubernetesExecutor,
    /// Where a task that fell back to another GPU class is queued again.
    pub queue: Queue,
    pub gpu_classes: GpuClasses,
    pub unschedulable_after: Duration,
    /// A pod unschedulable this long moves to the next fallback class.
    pub fallback_after: Duration,
    /// A running task whose runner was silent this long is `heartbeat_lost`; `None` when
    /// runners have nowhere to report (no report URL).
    pub heartbeat_timeout: Option<Duration>,
    pub fail_on_heartbeat_lost: bool,
    pub sweep_interval: Duration,
    /// How long a finished Job whose outcome is recorded is kept before it is deleted.
    pub keep_finished_jobs: Duration,
    pub lease: lease::LeaseConfig,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Tasks read per page of a sweep.
const SWEEP_PAGE: u32 = 500;
/// A Job missing this long after its task was launched is lost, not merely not yet seen.
const LOST_AFTER: Duration = Duration::from_secs(30);
/// Store reads one sweep spends on Jobs that may have to go; the rest wait for the next.
const CLEANUP_READS_PER_SWEEP: usize = 500;
/// Launched tasks without pods whose Job's events one sweep reads.
const REFUSAL_CHECKS_PER_SWEEP: usize = 50;
/// A Job younger than this has no pod yet only because the Job controller has not got
/// to it: no events to read.
const POD_CREATE_GRACE: Duration = Duration::from_secs(2);

impl Watcher {
    /// Runs until `shutdown` turns true, watching only while it holds the lease.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let elector = lease::Elector::new(self.client.clone(), self.lease.clone());
        while !*shutdown.borrow() {
            let leading = tokio::select! {
                leading = elector.acquire() => leading,
                _ = shutdown.changed() => break,
            };
            let Ok(mut lost) = leading else {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    _ = shutdown.changed() => break,
                }
            };
            tracing::info!(identity = %self.lease.identity, "watcher is the leader");
            tokio::select! {
                () = self.watch() => {}
                _ = lost.changed() => tracing::warn!("lost the watcher lease; standing by"),
                _ = shutdown.changed() => {}
            }
        }
        elector.release().await;
        tracing::info!("watcher stopped");
    }

    /// Watches Jobs and Pods, decides for every task they touch, and sweeps periodically.
    async fn watch(&self) {
        let selector = format!("{LABEL_MANAGED_BY}={MANAGED_BY}");
        let config = watcher::Config::default().labels(&selector);
        let (jobs, job_writer) = reflector::store::<Job>();
        let (pod_cache, pod_writer) = reflector::store::<Pod>();
        let pods = TaskPods::new(pod_cache, &self.namespace);
        let (touched_sender, mut touched) = mpsc::channel::<TaskId>(4096);

        let job_stream = watcher(
            Api::<Job>::namespaced(self.client.clone(), &self.namespace),
            config.clone(),
        )
        .default_backoff()
        .reflect(job_writer)
        .touched_objects()
        .map_ok(|job| (WatchedObject::Job, task_id_of(&job)))
        .boxed();
        let pod_stream = watcher(
            Api::<Pod>::namespaced(self.client.clone(), &self.namespace),
            config,
        )
        .default_backoff()
        .reflect(pod_writer)
        .touched_objects()
        .map_ok({
            let pods = pods.clone();
            move |pod| {
                pods.saw(&pod);
                (WatchedObject::Pod, task_id_of(&pod))
            }
        })
        .boxed();
        let sender = touched_sender.clone();
        let metrics = self.lifecycle.metrics().clone();
        let pump = async move {
            let mut merged = futures::stream::select(job_stream, pod_stream);
            while let Some(item) = merged.next().await {
                match item {
                    Ok((kind, id)) => {
                        metrics.kubernetes().watch_event(kind);
                        if let Some(id) = id
                            && sender.send(id).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(error) => {
                        metrics.kubernetes().watch_failed();
                        tracing::warn!(error = %error, "watch stream error (it retries with backoff)");
                    }
                }
            }
        };
        let decide_loop = async {
            let _ = jobs.wait_until_ready().await;
            let _ = pods.cache().wait_until_ready().await;
            tracing::info!("watch caches synced");
            let mut sweep = tokio::time::interval(self.sweep_interval);
            loop {
                tokio::select! {
                    id = touched.recv() => match id {
                        Some(id) => self.reconcile_task(id, &jobs, &pods).await,
                        None => return,
                    },
                    _ = sweep.tick() => self.sweep(&jobs, &pods).await,
                }
            }
        };
        tokio::select! {
            () = pump => tracing::warn!("watch streams ended"),
            () = decide_loop => {}
        }
    }

    /// Compares every task the cluster should be running with what the caches show.
    async fn sweep(&self, jobs: &Cache<Job>, pods: &TaskPods) {
        pods.reindex();
        let now = jiff::Timestamp::now();
        let mut attempts = BTreeMap::new();
        let mut launched = Vec::new();
        for state in [
            TaskState::Launching,
            TaskState::Launched,
            TaskState::Running,
        ] {
            // Page by page: every task in the state is swept, however many.
            let mut pages = self
                .lifecycle
                .store()
                .pages_in_state(state, now, SWEEP_PAGE);
            loop {
                let tasks = match pages.next().await {
                    Ok(Some(tasks)) => tasks,
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(error = %error, "sweep: listing tasks failed");
                        break;
                    }
                };
                for task in tasks {
                    attempts.insert(task.id, task.attempt);
                    if task.state == TaskState::Launched {
                        launched.push(task.clone());
                    }
                    self.reconcile(task, jobs, pods).await;
                }
            }
        }
        self.explain_refused_pods(&launched, jobs, pods, now).await;
        self.collect_jobs(jobs, &attempts, now).await;
        if let Some(timeout) = self.heartbeat_timeout {
            self.flag_silent_runners(now, timeout).await;
        }
    }

    /// Deletes the Jobs that have done their work (see [`cleanup`]): of tasks whose
    /// outcome is recorded (after the keep time), still running for tasks that ended, or
    /// of superseded attempts. `attempts` holds the current attempt of the tasks the
    /// sweep just listed, so a live task's Job costs nothing; any other Job costs a store
    /// read until it is gone (at most [`CLEANUP_READS_PER_SWEEP`] a sweep).
    async fn collect_jobs(
        &self,
        jobs: &Cache<Job>,
        attempts: &BTreeMap<TaskId, u32>,
        now: jiff::Timestamp,
    ) {
        let keep = self.keep_finished_jobs;
        let mut reads = 0;
        for job in jobs.state() {
            let Some(facts) = cleanup::JobFacts::of(&job) else {
                continue;
            };
            let live = attempts.get(&facts.task_id).copied();
            if cleanup::before_reading(&facts, live, keep, now) != cleanup::Verdict::ReadTask {
                continue;
            }
            if reads == CLEANUP_READS_PER_SWEEP {
                tracing::debug!(
                    "sweep: more jobs to collect than one sweep reads; the next goes on"
                );
                return;
            }
            reads += 1;
            let task = match self.lifecycle.store().task_summary(facts.task_id).await {
                Ok(task) => task,
                Err(error) => {
                    tracing::warn!(task_id = %facts.task_id, error = %error, "reading the task of a job failed");
                    continue;
                }
            };
            if let (cleanup::Verdict::Delete(why), Some(task)) = (
                cleanup::after_reading(&facts, task.as_ref(), keep, now),
                task.as_ref(),
            ) {
                self.delete_job(task, facts.attempt, why).await;
            }
        }
    }

    /// Deletes the Job of `attempt` of `task` (its pods go with it), counting it.
    async fn delete_job(&self, task: &TaskSummary, attempt: u32, why: JobDeletion) {
        let metrics = self.lifecycle.metrics().kubernetes();
        match self.executor.delete_attempt(task.id, attempt).await {
            Ok(()) => {
                metrics.job_deleted(why);
                tracing::debug!(task_id = %task.id, attempt, why = why.as_str(), "job deleted");
            }
            Err(error) => {
                metrics.job_delete_failed();
                tracing::warn!(task_id = %task.id, attempt, why = why.as_str(), error = %error, "deleting a job failed; the next sweep retries");
            }
        }
    }

    /// Reads the `FailedCreate` events of the Jobs of launched tasks that have no pod, and
    /// notes (or fails) what they say ([`decide::refused_pods`]).
    async fn explain_refused_pods(
        &self,
        launched: &[TaskSummary],
        jobs: &Cache<Job>,
        pods: &TaskPods,
        now: jiff::Timestamp,
    ) {
        let grace = jiff::SignedDuration::try_from(POD_CREATE_GRACE).unwrap_or_default();
        let events_api = Api::<Event>::namespaced(self.client.clone(), &self.namespace);
        let podless = launched.iter().filter_map(|task| {
            let name = job_name(&task.id, task.attempt);
            let job = jobs.get(&reflector::ObjectRef::new(&name).within(&self.namespace))?;
            let created = job.metadata.creation_timestamp.as_ref()?.0;
            let has_pods = !pods.of(task).is_empty();
            (!has_pods && now.duration_since(created) >= grace && !decide::job_is_finished(&job))
                .then_some((task, job, name))
        });
        for (task, job, name) in podless.take(REFUSAL_CHECKS_PER_SWEEP) {
            let selector = format!(
                "involvedObject.name={name},reason={}",
                decide::FAILED_CREATE
            );
            let events = match events_api
                .list(&ListParams::default().fields(&selector))
                .await
            {
                Ok(events) => events.items,
                Err(error) => {
                    tracing::warn!(task_id = %task.id, job = %name, error = %error, "reading the job's events failed");
                    continue;
                }
            };
            let events: Vec<&Event> = events.iter().collect();
            match decide::refused_pods(task, &job, &[], &events) {
                Decision::Note { reason, message } => {
                    match self
                        .lifecycle
                        .note(task.id, task.state, reason, &message)
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(task_id = %task.id, job = %name, reason = %reason, "the job's pods cannot be created yet");
                        }
                        Err(error) => {
                            tracing::warn!(task_id = %task.id, error = %error, "recording a note failed");
                        }
                    }
                }
                Decision::Move(step) => match self.lifecycle.apply(task.id, task.state, step).await
                {
                    Ok(Some(_)) => {
                        tracing::warn!(task_id = %task.id, job = %name, "kubernetes refuses the job's pods for good; task failed");
                        if self.keep_finished_jobs.is_zero() {
                            self.delete_job(task, task.attempt, JobDeletion::TaskEnded)
                                .await;
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(task_id = %task.id, error = %error, "recording a transition failed");
                    }
                },
                _ => {}
            }
        }
    }

    /// Running tasks whose runner has not reported for `timeout`: noted (or failed).
    async fn flag_silent_runners(&self, now: jiff::Timestamp, timeout: Duration) {
        let since = now
            .checked_sub(jiff::SignedDuration::try_from(timeout).unwrap_or_default())
            .unwrap_or(now);
        let silent = match self
            .lifecycle
            .store()
            .silent_running_tasks(since, 1000)
            .await
        {
            Ok(silent) => silent,
            Err(error) => {
                tracing::warn!(error = %error, "sweep: listing silent tasks failed");
                return;
            }
        };
        let message = format!(
            "the runner has not reported for more than {}s",
            timeout.as_secs()
        );
        for task in silent {
            if self.fail_on_heartbeat_lost {
                let failed = Move::HeartbeatLost {
                    message: message.clone(),
                };
                match self
                    .lifecycle
                    .apply(task.id, TaskState::Running, failed)
                    .await
                {
                    Ok(Some(_)) => {
                        tracing::warn!(task_id = %task.id, "heartbeat lost; task failed");
                        if let Err(error) = self.executor.delete(&task).await {
                            tracing::warn!(task_id = %task.id, error = %error, "deleting the job of a silent task failed");
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(task_id = %task.id, error = %error, "failing a silent task failed");
                    }
                }
            } else if task.reason != Some(Reason::HeartbeatLost) {
                match self
                    .lifecycle
                    .note(task.id, TaskState::Running, Reason::HeartbeatLost, &message)
                    .await
                {
                    Ok(Some(_)) => tracing::warn!(task_id = %task.id, "heartbeat lost"),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(task_id = %task.id, error = %error, "noting a lost heartbeat failed");
                    }
                }
            }
        }
    }

    /// Where `task` may go if its pod cannot be scheduled: the next fallback class.
    fn fallback_for(&self, task: &TaskSummary) -> Option<Fallback> {
        let gpu = task
            .resources
            .gpu
            .as_ref()
            .filter(|gpu| gpu.allow_fallback)?;
        let current = task.gpu_class.as_deref().unwrap_or(&gpu.class);
        let next = self
            .gpu_classes
            .next_fallback(&gpu.class, current, gpu.count)?;
        Some(Fallback {
            class: next.name.clone(),
            after: self.fallback_after,
        })
    }

    /// Moves `task` to a new attempt on `class`, queues it, and deletes the old Job.
    async fn fall_back(&self, task: &TaskSummary, class: String, message: String) {
        let fall_back = Move::FallBack {
            class,
            attempt: task.attempt + 1,
            message,
        };
        match self.lifecycle.apply(task.id, task.state, fall_back).await {
            Ok(Some(moved)) => {
                tracing::info!(task_id = %task.id, attempt = moved.attempt, class = ?moved.gpu_class, "task falls back to another GPU class");
                let entry = QueueEntry::of(&moved);
                if let Err(error) = self.queue.enqueue(&entry).await {
                    tracing::warn!(task_id = %task.id, error = %error, "enqueue failed; the reconciler will enqueue the task");
                }
                if let Err(error) = self.executor.delete_attempt(task.id, task.attempt).await {
                    tracing::warn!(task_id = %task.id, error = %error, "deleting the old attempt's job failed; the sweep retries");
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(task_id = %task.id, error = %error, "recording a fallback failed");
            }
        }
    }

    /// Reads one task a watch event touched, then decides for it.
    async fn reconcile_task(&self, id: TaskId, jobs: &Cache<Job>, pods: &TaskPods) {
        match self.lifecycle.store().task_summary(id).await {
            Ok(Some(task)) => self.reconcile(task, jobs, pods).await,
            Ok(None) => {}
            Err(error) => tracing::warn!(task_id = %id, error = %error, "reading the task failed"),
        }
    }

    /// Decides for one task, as just read from the store, and applies the decision.
    async fn reconcile(&self, task: TaskSummary, jobs: &Cache<Job>, pods: &TaskPods) {
        let name = job_name(&task.id, task.attempt);
        let job = jobs.get(&reflector::ObjectRef::new(&name).within(&self.namespace));
        let task_pods = pods.of(&task);
        let pod_refs: Vec<&Pod> = task_pods.iter().map(AsRef::as_ref).collect();
        let now = jiff::Timestamp::now();

        let decision =
            if job.is_none() && matches!(task.state, TaskState::Launched | TaskState::Running) {
                let since = now.duration_since(task.updated_at);
                if since >= jiff::SignedDuration::try_from(LOST_AFTER).unwrap_or_default() {
                    Decision::Move(Move::Lost {
                        message: format!("job {name} disappeared before reporting an outcome"),
                    })
                } else {
                    Decision::Nothing
                }
            } else {
                decide(
                    &task,
                    job.as_deref(),
                    &pod_refs,
                    now,
                    self.unschedulable_after,
                    self.fallback_for(&task).as_ref(),
                )
            };

        match decision {
            Decision::Nothing => {}
            Decision::Move(step) => {
                if step.target().is_terminal()
                    && let Some(summary) = decide::termination_summary(&pod_refs)
                    && let Err(error) = self
                        .lifecycle
                        .record_termination(task.id, task.attempt, &summary)
                        .await
                {
                    tracing::warn!(task_id = %task.id, error = %error, "keeping the runner's summary failed");
                }
                match self.lifecycle.apply(task.id, task.state, step).await {
                    Ok(Some(updated)) => {
                        tracing::debug!(task_id = %task.id, tenant = %task.tenant, job = %name, from = %task.state, to = %updated.state, reason = ?updated.reason, "job or pod moved the task");
                        // The outcome is recorded: the Job has done its work (the sweep
                        // deletes it later when it is to be kept, or if this fails).
                        if updated.state.is_terminal()
                            && job.is_some()
                            && self.keep_finished_jobs.is_zero()
                        {
                            self.delete_job(&task, task.attempt, JobDeletion::OutcomeRecorded)
                                .await;
                        }
                    }
                    Ok(None) => {
                        tracing::debug!(task_id = %task.id, "task moved concurrently; will decide again on the next event");
                    }
                    Err(error) => {
                        tracing::warn!(task_id = %task.id, error = %error, "recording a transition failed");
                    }
                }
            }
            Decision::DeleteJob => {
                self.delete_job(&task, task.attempt, JobDeletion::TaskEnded)
                    .await;
            }
            Decision::FallBack { class, message } => self.fall_back(&task, class, message).await,
            Decision::Note { reason, message } => {
                if let Err(error) = self
                    .lifecycle
                    .note(task.id, task.state, reason, &message)
                    .await
                {
                    tracing::warn!(task_id = %task.id, error = %error, "recording a note failed");
                } else {
                    tracing::info!(task_id = %task.id, job = %name, reason = %reason, "task is stuck");
                }
            }
        }
    }
}

/// The task a Job or pod belongs to, from its label.
fn task_id_of<K: kube::Resource>(object: &K) -> Option<TaskId> {
    let labels: &BTreeMap<String, String> = object.meta().labels.as_ref()?;
    let simple = labels.get(LABEL_TASK_ID)?;
    uuid::Uuid::try_parse(simple).ok().map(TaskId)
}
