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
//!   deletes any unfinished Job of an attempt that is no longer its task's current one, so a crash
//!   in between leaves no second pod running;
//! - the sweep flags running tasks whose runner fell silent (`heartbeat_lost`), and fails
//!   them when configured to.

pub mod decide;
pub mod lease;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::metrics::WatchedObject;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store as Cache};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, ResourceExt as _};
use tokio::sync::{mpsc, watch};

use crate::launcher::KubernetesExecutor;
use crate::launcher::job_spec::{
    LABEL_ATTEMPT, LABEL_MANAGED_BY, LABEL_TASK_ID, MANAGED_BY, job_name,
};
use crate::lifecycle::Lifecycle;
use crate::placement::GpuClasses;
use crate::queue::{Queue, QueueEntry};
use crate::task::lifecycle::Move;
use crate::task::{Reason, Task, TaskId, TaskState};

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
    pub lease: lease::LeaseConfig,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// A Job missing this long after its task was launched is lost, not merely not yet seen.
const LOST_AFTER: Duration = Duration::from_secs(30);

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
        let (pods, pod_writer) = reflector::store::<Pod>();
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
        .map_ok(|pod| (WatchedObject::Pod, task_id_of(&pod)))
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
            let _ = pods.wait_until_ready().await;
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
    async fn sweep(&self, jobs: &Cache<Job>, pods: &Cache<Pod>) {
        let now = jiff::Timestamp::now();
        let mut attempts = BTreeMap::new();
        for state in [
            TaskState::Launching,
            TaskState::Launched,
            TaskState::Running,
        ] {
            match self
                .lifecycle
                .store()
                .tasks_in_state(state, now, 10_000)
                .await
            {
                Ok(tasks) => {
                    for task in tasks {
                        attempts.insert(task.id, task.attempt);
                        self.reconcile(task, jobs, pods).await;
                    }
                }
                Err(error) => tracing::warn!(error = %error, "sweep: listing tasks failed"),
            }
        }
        self.delete_superseded_jobs(jobs, &attempts).await;
        if let Some(timeout) = self.heartbeat_timeout {
            self.flag_silent_runners(now, timeout).await;
        }
    }

    /// Deletes the Jobs of attempts that are no longer their task's current one (a
    /// fallback whose delete did not happen, or happened before a crash). `attempts` holds
    /// the current attempt of the tasks the sweep just listed, so only a live Job of any
    /// other task (one queued again after a fallback) costs a store read; finished Jobs
    /// run no pod and are left to their TTL.
    async fn delete_superseded_jobs(&self, jobs: &Cache<Job>, attempts: &BTreeMap<TaskId, u32>) {
        for job in jobs.state() {
            if job.metadata.deletion_timestamp.is_some() || decide::job_is_finished(&job) {
                continue;
            }
            let Some(id) = task_id_of(job.as_ref()) else {
                continue;
            };
            let Some(attempt) = job
                .labels()
                .get(LABEL_ATTEMPT)
                .and_then(|a| a.parse::<u32>().ok())
            else {
                continue;
            };
            if attempts.get(&id).is_some_and(|&current| current == attempt) {
                continue;
            }
            match self.lifecycle.store().task(id).await {
                Ok(Some(task)) if task.attempt > attempt => {
                    if let Err(error) = self.executor.delete_attempt(&task, attempt).await {
                        tracing::warn!(task_id = %id, attempt, error = %error, "deleting a superseded job failed");
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(task_id = %id, error = %error, "reading the task failed");
                }
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
    fn fallback_for(&self, task: &Task) -> Option<Fallback> {
        let gpu = task
            .spec
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
    async fn fall_back(&self, task: &Task, class: String, message: String) {
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
                if let Err(error) = self.executor.delete_attempt(task, task.attempt).await {
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
    async fn reconcile_task(&self, id: TaskId, jobs: &Cache<Job>, pods: &Cache<Pod>) {
        match self.lifecycle.store().task(id).await {
            Ok(Some(task)) => self.reconcile(task, jobs, pods).await,
            Ok(None) => {}
            Err(error) => tracing::warn!(task_id = %id, error = %error, "reading the task failed"),
        }
    }

    /// Decides for one task, as just read from the store, and applies the decision.
    async fn reconcile(&self, task: Task, jobs: &Cache<Job>, pods: &Cache<Pod>) {
        let name = job_name(&task.id, task.attempt);
        let job = jobs.get(&reflector::ObjectRef::new(&name).within(&self.namespace));
        let attempt = task.attempt.to_string();
        let task_pods: Vec<std::sync::Arc<Pod>> = pods
            .state()
            .into_iter()
            .filter(|pod| {
                let labels = pod.labels();
                labels.get(LABEL_TASK_ID) == Some(&task.id.simple())
                    && labels.get(LABEL_ATTEMPT) == Some(&attempt)
            })
            .collect();
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
                if let Err(error) = self.executor.delete(&task).await {
                    tracing::warn!(task_id = %task.id, job = %name, error = %error, "deleting the job of a finished task failed");
                }
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
