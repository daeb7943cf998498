//! The task domain: what a task is, the states it moves through, and which moves are
//! allowed. Pure: nothing here knows about Kubernetes, SQL, Redis or HTTP.
//!
//! Invariants:
//! - a task's state only changes along [`TaskState::can_move_to`]; terminal states never
//!   change again;
//! - a [`TaskSpec`] only exists validated (see [`submission`]), so every later stage can
//!   trust its names, quantities and limits.

pub mod env;
#[cfg(test)]
pub mod fixtures;
pub mod lifecycle;
/// Kubernetes quantities, kept in [`crate::k8s`] so the placement file can use them too.
pub use crate::k8s::quantity;
pub mod quota;
pub mod retry;
pub mod submission;
pub mod summary;
pub mod webhook;
pub mod workload;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use env::{EnvValue, SecretRef};
pub use quantity::{Cpu, Memory};
pub use summary::TaskSummary;

/// A task's identity: a UUIDv7, so ids sort by creation time (newest-first listing and
/// cursors need no separate sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub Uuid);

impl TaskId {
    /// A new, time-ordered id.
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The 32 lowercase hex digits, the form used in Kubernetes names and labels.
    #[must_use]
    pub fn simple(&self) -> String {
        self.0.simple().to_string()
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Where a task is in its life.
///
/// `queued → launching → launched → running → succeeded | failed | cancelled | timed_out`,
/// and `expired` for a task that never got launched in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Stored and waiting in its queue.
    Queued,
    /// Claimed by a launcher, which is creating its Job (or process).
    Launching,
    /// Its Job exists; no pod runs it yet.
    Launched,
    /// A pod (or process) runs it.
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    /// It waited longer than allowed and was never launched.
    Expired,
}

impl TaskState {
    pub const ALL: [Self; 9] = [
        Self::Queued,
        Self::Launching,
        Self::Launched,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
        Self::Expired,
    ];

    /// The name used in the API, the store and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Launching => "launching",
            Self::Launched => "launched",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
            Self::Expired => "expired",
        }
    }

    /// No state follows a terminal one.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut | Self::Expired
        )
    }

    /// Whether a task in `self` may move to `next`.
    ///
    /// Moves may skip intermediate states (a watcher that was down can see a Job that
    /// already finished), but never go back, except to `queued` for a new attempt: a
    /// fallback GPU class (`launched → queued`) or a retry after a failed attempt (from
    /// `launching`, `launched` or `running`).
    #[must_use]
    pub fn can_move_to(self, next: Self) -> bool {
        use TaskState::{
            Cancelled, Expired, Failed, Launched, Launching, Queued, Running, Succeeded, TimedOut,
        };
        if self.is_terminal() || self == next {
            return false;
        }
        match next {
            // A new attempt: launched → queued when no node of its GPU class took the
            // pod (the next fallback class), and launching, launched or running → queued
            // when an attempt failed and its retry policy gives it another.
            Queued => matches!(self, Launching | Launched | Running),
            Launched => self == Launching,
            Launching => self == Queued,
            // Expired: never launched within its queue TTL, in the queue or waiting for
            // room in the cluster.
            Expired => matches!(self, Queued | Launching),
            Running => matches!(self, Launching | Launched),
            Succeeded | TimedOut => matches!(self, Launching | Launched | Running),
            Failed | Cancelled => true,
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not one of the state names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task state '{0}'")]
pub struct UnknownState(pub String);

impl FromStr for TaskState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A GPU request: how many, of which class (`v100`, `a100`, `h100`, a MIG profile class…).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuRequest {
    pub count: u32,
    pub class: String,
    /// Whether a task that cannot be placed on `class` may move to the class's configured
    /// fallbacks (as a new attempt).
    #[serde(default = "yes")]
    pub allow_fallback: bool,
}

fn yes() -> bool {
    true
}

/// What kind of work a task is, which decides its shared memory (see
/// [`workload`]).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// Machine learning: training, fine-tuning, inference.
    Ml,
    /// Computer vision pipelines.
    Cv,
    /// Anything else.
    #[default]
    Cpu,
}

impl WorkloadKind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ml => "ml",
            Self::Cv => "cv",
            Self::Cpu => "cpu",
        }
    }

    /// ML and CV data loaders pass batches through `/dev/shm`.
    #[must_use]
    pub fn wants_shared_memory(self) -> bool {
        matches!(self, Self::Ml | Self::Cv)
    }
}

/// The kind a submission declares; `auto` lets agent-bus decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadRequest {
    #[default]
    Auto,
    Ml,
    Cv,
    Cpu,
}

/// A shared PersistentVolumeClaim mounted into the task's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeMount {
    /// The claim's name (one the operator shares with this tenant).
    pub claim: String,
    /// Absolute path in the container.
    pub mount_path: String,
    pub read_only: bool,
}

/// A per-task scratch volume: a generic ephemeral volume, created with the pod and
/// deleted with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Scratch {
    #[schema(value_type = String)]
    pub size: Memory,
    pub mount_path: String,
}

/// What a task asks of a node. `None` means the cluster's LimitRange default applies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resources {
    /// CPU in Kubernetes notation, canonical (`500m`, `2`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub cpu: Option<Cpu>,
    /// Memory in Kubernetes notation, canonical (`512Mi`, `2Gi`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub memory: Option<Memory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRequest>,
}

/// A validated submission: everything needed to run the task, nothing about its progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskSpec {
    /// RFC 1123 label, at most 63 characters.
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// Plain values, and references to keys of the tenant's secrets (never their values).
    pub env: BTreeMap<String, EnvValue>,
    pub resources: Resources,
    pub timeout_seconds: u32,
    pub max_retries: u32,
    /// How failed attempts are retried; `None`: the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<retry::RetryPolicy>,
    /// How long the task may wait to be launched before it expires; `None`: the
    /// tenant's default, else as long as it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ttl_seconds: Option<u32>,
    /// Higher runs first within a queue.
    pub priority: i32,
    pub queue: String,
    pub labels: BTreeMap<String, String>,
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
    /// The kind of work, as declared or detected (never `auto` once stored).
    #[serde(default)]
    pub workload: WorkloadKind,
    /// The size of `/dev/shm` (a memory-backed volume), explicit or by the shm rule;
    /// `None` keeps the container runtime's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub shm: Option<Memory>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<Scratch>,
    /// Where the task's state changes are POSTed (Standard Webhooks, see
    /// docs/WEBHOOKS.md); `None`: the tenant's default webhook, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<webhook::WebhookSpec>,
}

/// Why a task is in its state; travels with the state into the API, events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The command exited non-zero.
    ExitCode,
    /// The Job's backoff limit was reached.
    BackoffLimit,
    /// The task ran past its timeout (`activeDeadlineSeconds`).
    DeadlineExceeded,
    /// The container was killed for using more memory than it asked for.
    OomKilled,
    /// The image could not be pulled.
    ImagePull,
    /// No node can hold the pod (yet); visible while the task waits.
    Unschedulable,
    /// The pod was evicted or preempted.
    Evicted,
    /// The tenant cancelled it.
    CancelledByUser,
    /// Kubernetes refused the Job (forbidden, invalid, namespace missing).
    LaunchRejected,
    /// The Job disappeared without reporting an outcome.
    JobLost,
    /// The runner stopped sending heartbeats.
    HeartbeatLost,
    /// The GPU failed (Xid error, CUDA error).
    GpuError,
    /// CUDA ran out of GPU memory.
    GpuOutOfMemory,
    /// The command failed in a way that retrying cannot fix.
    UserError,
    /// No node of the GPU class could take the pod in time: the task moved to the next
    /// fallback class as a new attempt.
    FellBack,
    /// It waited in its queue longer than its queue TTL.
    QueueTtl,
    /// An attempt failed and the retry policy gave it another: it waits out its backoff
    /// in the queue (`next_attempt_at`).
    Retrying,
    /// Its tenant's budget was spent (action `refuse`) when it was to be retried.
    BudgetExhausted,
    /// Its tenant runs as much as its quota allows; it starts when capacity frees.
    TenantQuota,
    /// The cluster's ResourceQuota (or LimitRange) has no room for its Job or pod yet; it
    /// launches when room frees.
    ClusterQuota,
}

impl Reason {
    pub const ALL: [Self; 20] = [
        Self::ExitCode,
        Self::BackoffLimit,
        Self::DeadlineExceeded,
        Self::OomKilled,
        Self::ImagePull,
        Self::Unschedulable,
        Self::Evicted,
        Self::CancelledByUser,
        Self::LaunchRejected,
        Self::JobLost,
        Self::HeartbeatLost,
        Self::GpuError,
        Self::GpuOutOfMemory,
        Self::UserError,
        Self::FellBack,
        Self::QueueTtl,
        Self::Retrying,
        Self::BudgetExhausted,
        Self::TenantQuota,
        Self::ClusterQuota,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExitCode => "exit_code",
            Self::BackoffLimit => "backoff_limit",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::OomKilled => "oom_killed",
            Self::ImagePull => "image_pull",
            Self::Unschedulable => "unschedulable",
            Self::Evicted => "evicted",
            Self::CancelledByUser => "cancelled_by_user",
            Self::LaunchRejected => "launch_rejected",
            Self::JobLost => "job_lost",
            Self::HeartbeatLost => "heartbeat_lost",
            Self::GpuError => "gpu_error",
            Self::GpuOutOfMemory => "gpu_out_of_memory",
            Self::UserError => "user_error",
            Self::FellBack => "fell_back",
            Self::QueueTtl => "queue_ttl",
            Self::Retrying => "retrying",
            Self::BudgetExhausted => "budget_exhausted",
            Self::TenantQuota => "tenant_quota",
            Self::ClusterQuota => "cluster_quota",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Reason {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|reason| reason.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A task as the dispatcher knows it: its spec and where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    /// The tenant that owns it; an RFC 1123 label.
    pub tenant: String,
    pub spec: TaskSpec,
    pub state: TaskState,
    pub reason: Option<Reason>,
    /// Human-readable detail for the state (the last lines of a failure, a Kubernetes
    /// error message).
    pub message: Option<String>,
    /// 1 for the first run; each retry is a new attempt with its own Job.
    pub attempt: u32,
    /// The GPU class the current attempt runs on: the requested class, or a fallback the
    /// task moved to. `None` for tasks without GPUs.
    pub gpu_class: Option<String>,
    pub exit_code: Option<i32>,
    pub created_at: jiff::Timestamp,
    pub updated_at: jiff::Timestamp,
    /// When the current attempt's stages began.
    pub timeline: Timeline,
    /// What the task has spent so far.
    pub spent: Spent,
    /// When it expires if it is still queued (its queue TTL, or its tenant's default).
    pub expires_at: Option<jiff::Timestamp>,
    /// The retries it has had (counted against `max_retries`, and free ones).
    pub retries: retry::RetryCount,
    /// While it waits out a retry's backoff: when the next attempt may be launched.
    pub next_attempt_at: Option<jiff::Timestamp>,
    /// Nodes its next attempts keep off (a hardware failure there).
    pub avoid_nodes: Vec<String>,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// No node of its GPU class took it: the next attempt runs on a fallback class.
    FellBack,
}

impl AttemptOutcome {
    pub const ALL: [Self; 5] = [
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
        Self::FellBack,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::FellBack => "fell_back",
        }
    }
}

impl FromStr for AttemptOutcome {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// One ended attempt of a task: how it ended, where it ran, what it cost, and what the
/// retry policy made of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub outcome: AttemptOutcome,
    pub reason: Option<Reason>,
    pub failure_class: Option<retry::FailureClass>,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    /// The node it ran on, when known.
    pub node: Option<String>,
    pub gpu_class: Option<String>,
    pub launched_at: Option<jiff::Timestamp>,
    pub started_at: Option<jiff::Timestamp>,
    pub ended_at: jiff::Timestamp,
    /// Its compute cost.
    pub cost: Breakdown,
    /// What the retry policy did with a failed attempt.
    pub action: Option<retry::RetryAction>,
    /// Why: the rule that decided, the backoff, or why no retry followed.
    pub decision: Option<String>,
    /// What the next attempt changed, one line each.
    pub changes: Vec<String>,
}

/// When the stages of a task's current attempt began (`None`: not reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timeline {
    /// The submission, or the requeue that began the current attempt.
    pub queued_at: Option<jiff::Timestamp>,
    /// Its Job (or process) was created.
    pub launched_at: Option<jiff::Timestamp>,
    /// The runner started the command (or the pod ran).
    pub started_at: Option<jiff::Timestamp>,
    /// The final state.
    pub finished_at: Option<jiff::Timestamp>,
}

/// What a task has spent, in dollars.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Spent {
    /// GPU, CPU and memory, fixed when the task finished; `None` before.
    pub compute: Option<Breakdown>,
    /// Summed from the runner's usage reports as they arrive.
    pub llm_dollars: f64,
    /// The compute cost of the attempts before the current one (included in `compute`
    /// once the task is over).
    pub earlier_attempts: Breakdown,
}

impl Task {
    /// A new task of `tenant`: queued, first attempt, created now.
    #[must_use]
    pub fn new(tenant: impl Into<String>, spec: TaskSpec) -> Self {
        let now = jiff::Timestamp::now();
        let gpu_class = spec.resources.gpu.as_ref().map(|gpu| gpu.class.clone());
        Self {
            id: TaskId::new(),
            tenant: tenant.into(),
            spec,
            state: TaskState::Queued,
            reason: None,
            message: None,
            attempt: 1,
            gpu_class,
            exit_code: None,
            created_at: now,
            updated_at: now,
            timeline: Timeline {
                queued_at: Some(now),
                ..Timeline::default()
            },
            spent: Spent::default(),
            expires_at: None,
            retries: retry::RetryCount::default(),
            next_attempt_at: None,
            avoid_nodes: Vec::new(),
        }
    }
}

/// Dollars by resource (per hour or in total, as the context says).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Breakdown {
    pub gpu: f64,
    pub cpu: f64,
    pub memory: f64,
}

impl Breakdown {
    #[must_use]
    pub fn total(&self) -> f64 {
        self.gpu + self.cpu + self.memory
    }

    #[must_use]
    pub fn plus(&self, other: &Self) -> Self {
        Self {
            gpu: self.gpu + other.gpu,
            cpu: self.cpu + other.cpu,
            memory: self.memory + other.memory,
        }
    }

    #[must_use]
    pub fn times(&self, factor: f64) -> Self {
        Self {
            gpu: self.gpu * factor,
            cpu: self.cpu * factor,
            memory: self.memory * factor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TaskState::{
        self, Cancelled, Expired, Failed, Launched, Launching, Queued, Running, Succeeded, TimedOut,
    };

    #[test]
    fn names_round_trip() {
        for state in TaskState::ALL {
            assert_eq!(state.as_str().parse::<TaskState>(), Ok(state));
        }
        assert!("done".parse::<TaskState>().is_err());
    }

    #[test]
    fn terminal_states_never_move() {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in TaskState::ALL {
                assert!(!from.can_move_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn the_lifecycle_moves_forward_and_may_skip() {
        let allowed = [
            (Queued, Launching),
            (Launching, Launched),
            (Launched, Running),
            (Running, Succeeded),
            (Running, Failed),
            (Running, TimedOut),
            (Launched, Succeeded),
            (Launching, Running),
            (Queued, Cancelled),
            (Queued, Expired),
            (Launching, Expired),
            (Queued, Failed),
            (Launching, Queued),
            (Launched, Queued),
            (Running, Queued),
        ];
        for (from, to) in allowed {
            assert!(from.can_move_to(to), "{from} -> {to} should be allowed");
        }
        let refused = [
            (Running, Launched),
            (Launched, Launching),
            (Queued, Running),
            (Queued, Succeeded),
            (Running, Expired),
            (Launched, Expired),
            (Queued, Queued),
        ];
        for (from, to) in refused {
            assert!(!from.can_move_to(to), "{from} -> {to} should be refused");
        }
    }
}
