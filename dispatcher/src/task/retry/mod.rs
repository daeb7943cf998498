//! Retry policies: what a failed attempt means for its task. Pure: from the failure (its
//! class, exit code and node), the task's policy, the operator's defaults and how many
//! retries the task has used, [`judge`] says whether a new attempt follows, whether it
//! counts against `max_retries`, after which [`backoff`], and [`plan_changes`] says what the
//! next attempt changes (more memory, a GPU class with more memory, another node).
//!
//! Invariants:
//! - rules are ordered, first match wins (like Kubernetes' `podFailurePolicy`): the task's
//!   own rules first, then the operator's default rules, then `retry`;
//! - an `ignore` retries without counting (disruptions are free), but at most
//!   [`RetryDefaults::max_ignored_attempts`] times, then it counts like a `retry`;
//! - a counted retry only happens while `retries_used < max_retries`;
//! - backoff doubles with each attempt from the base, is capped, and is jittered into
//!   `[d/2, d]` by a value derived from the task and attempt (the same inputs give the
//!   same wait, so a restarted dispatcher agrees with the one that planned it);
//! - a change never grows memory past [`RetryDefaults::max_memory`], never picks a GPU
//!   class that cannot hold the task's GPUs on one node, and avoids at most
//!   [`MAX_AVOIDED_NODES`] nodes.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Memory;
use crate::placement::GpuClasses;

#[cfg(test)]
mod tests;

/// The most rules a task's policy may have.
pub const MAX_RULES: usize = 16;
/// The most exit codes or failure classes one rule may list.
pub const MAX_MATCHES_PER_RULE: usize = 32;
/// The longest base backoff a policy may ask for.
pub const MAX_BACKOFF_SECONDS: u32 = 3600;
/// The longest capped backoff a policy may ask for: a day.
pub const MAX_BACKOFF_CAP_SECONDS: u32 = 24 * 3600;
/// The largest memory factor a rule may ask for.
pub const MAX_MEMORY_FACTOR: f64 = 4.0;
/// The most nodes a task avoids; the oldest is forgotten first.
pub const MAX_AVOIDED_NODES: usize = 16;

/// Why an attempt failed, as the runner (inside the pod) or the watcher (from the Job and
/// pod status) tells it. The one table of classes is in `docs/LIFECYCLE.md`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The container was killed for using more memory than its limit (host OOM).
    Oom,
    /// CUDA ran out of GPU memory.
    CudaOom,
    /// The GPU reported an Xid error.
    Xid,
    /// A signal from outside ended the command.
    Signal,
    /// The command exited non-zero on its own.
    ExitCode,
    /// The attempt ran past the task's timeout.
    Timeout,
    /// The runner stopped sending heartbeats.
    HeartbeatLost,
    /// The image could not be pulled.
    ImagePull,
    /// The pod was never scheduled before the attempt's deadline.
    Unschedulable,
    /// The pod was evicted or preempted (a disruption).
    Evicted,
    /// The Job or pod disappeared without an outcome (node loss, deletion; a disruption).
    JobLost,
    /// Kubernetes refused the Job.
    LaunchRejected,
}

impl FailureClass {
    pub const ALL: [Self; 12] = [
        Self::Oom,
        Self::CudaOom,
        Self::Xid,
        Self::Signal,
        Self::ExitCode,
        Self::Timeout,
        Self::HeartbeatLost,
        Self::ImagePull,
        Self::Unschedulable,
        Self::Evicted,
        Self::JobLost,
        Self::LaunchRejected,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oom => "oom",
            Self::CudaOom => "cuda_oom",
            Self::Xid => "xid",
            Self::Signal => "signal",
            Self::ExitCode => "exit_code",
            Self::Timeout => "timeout",
            Self::HeartbeatLost => "heartbeat_lost",
            Self::ImagePull => "image_pull",
            Self::Unschedulable => "unschedulable",
            Self::Evicted => "evicted",
            Self::JobLost => "job_lost",
            Self::LaunchRejected => "launch_rejected",
        }
    }

    /// The class the runner named from inside the pod.
    #[must_use]
    pub fn from_runner(class: protocol::FailureClass) -> Self {
        match class {
            protocol::FailureClass::UserError => Self::ExitCode,
            protocol::FailureClass::HostOom => Self::Oom,
            protocol::FailureClass::CudaOom => Self::CudaOom,
            protocol::FailureClass::GpuXid => Self::Xid,
            protocol::FailureClass::Timeout => Self::Timeout,
            protocol::FailureClass::Signal => Self::Signal,
        }
    }

    /// The class a failure reason implies when nobody named one.
    #[must_use]
    pub fn of_reason(reason: Option<super::Reason>) -> Self {
        use super::Reason;
        match reason {
            Some(Reason::OomKilled) => Self::Oom,
            Some(Reason::GpuOutOfMemory) => Self::CudaOom,
            Some(Reason::GpuError) => Self::Xid,
            Some(Reason::DeadlineExceeded) => Self::Timeout,
            Some(Reason::HeartbeatLost) => Self::HeartbeatLost,
            Some(Reason::ImagePull) => Self::ImagePull,
            Some(Reason::Unschedulable) => Self::Unschedulable,
            Some(Reason::Evicted) => Self::Evicted,
            Some(Reason::JobLost) => Self::JobLost,
            Some(Reason::LaunchRejected) => Self::LaunchRejected,
            _ => Self::ExitCode,
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FailureClass {
    type Err = super::UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|class| class.as_str() == s)
            .ok_or_else(|| super::UnknownState(s.to_owned()))
    }
}

/// What a matching rule does with the failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetryAction {
    /// A new attempt, counted against `max_retries`.
    Retry,
    /// The task fails now, whatever retries are left.
    Fail,
    /// A new attempt that does not count (a disruption is not the task's fault).
    Ignore,
}

impl RetryAction {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Fail => "fail",
            Self::Ignore => "ignore",
        }
    }
}

impl std::str::FromStr for RetryAction {
    type Err = super::UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Retry, Self::Fail, Self::Ignore]
            .into_iter()
            .find(|action| action.as_str() == s)
            .ok_or_else(|| super::UnknownState(s.to_owned()))
    }
}

/// A memory factor: finite, above 1 and at most [`MAX_MEMORY_FACTOR`] (checked where it
/// is made), so it compares as a number.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Factor(f64);

impl Eq for Factor {}

impl Factor {
    /// `factor` when it is finite, above 1 and at most [`MAX_MEMORY_FACTOR`].
    #[must_use]
    pub fn new(factor: f64) -> Option<Self> {
        (factor.is_finite() && factor > 1.0 && factor <= MAX_MEMORY_FACTOR).then_some(Self(factor))
    }

    #[must_use]
    pub fn get(self) -> f64 {
        self.0
    }
}

/// What the next attempt changes, when a rule retries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Mutation {
    /// Multiply the memory request (and limit) by this factor, up to the configured
    /// maximum (e.g. `1.5` on `oom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, minimum = 1.0, maximum = 4.0)]
    pub memory_factor: Option<Factor>,
    /// Move to the next GPU class with more memory per GPU (the placement file's
    /// `gpu_memory_order`), e.g. on `cuda_oom`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub next_gpu_class: bool,
    /// Keep the next attempts off the node this attempt failed on (e.g. on `xid`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub avoid_failed_node: bool,
}

impl Mutation {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One rule: when it matches, and what it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRule {
    pub action: RetryAction,
    /// Matches when the exit code is one of these (empty: any exit code).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_exit_codes: Vec<i32>,
    /// Matches when the failure class is one of these (empty: any class).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_failure_classes: Vec<FailureClass>,
    #[serde(default, skip_serializing_if = "Mutation::is_empty")]
    pub mutate: Mutation,
}

impl RetryRule {
    /// Whether this rule matches `failure`: every list it has names the failure.
    #[must_use]
    pub fn matches(&self, failure: &AttemptFailure) -> bool {
        let code = self.on_exit_codes.is_empty()
            || failure
                .exit_code
                .is_some_and(|code| self.on_exit_codes.contains(&code));
        let class =
            self.on_failure_classes.is_empty() || self.on_failure_classes.contains(&failure.class);
        code && class
    }
}

/// A task's retry policy, as validated (`None`: the operator's default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// The first backoff; each further attempt doubles it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_seconds: Option<u32>,
    /// The longest backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff_seconds: Option<u32>,
    /// Checked in order before the operator's default rules; the first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RetryRule>,
}

/// The operator's retry settings (configuration and the placement file's `retry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryDefaults {
    pub backoff_seconds: u32,
    pub max_backoff_seconds: u32,
    /// Checked after every task's own rules.
    pub rules: Vec<RetryRule>,
    /// Memory never grows past this.
    pub max_memory: Memory,
    /// How many `ignore`d failures a task gets for free before they count.
    pub max_ignored_attempts: u32,
}

impl Default for RetryDefaults {
    /// 10 s doubling to 10 min; disruptions (eviction, a lost Job) retried for free; OOM
    /// grows memory ×1.5 up to 1 TiB; CUDA OOM moves to a class with more GPU memory; an
    /// Xid avoids the node; a refused launch or an image that cannot be pulled fails at
    /// once.
    fn default() -> Self {
        let rule = |action, classes: &[FailureClass], mutate| RetryRule {
            action,
            on_exit_codes: Vec::new(),
            on_failure_classes: classes.to_vec(),
            mutate,
        };
        Self {
            backoff_seconds: 10,
            max_backoff_seconds: 600,
            rules: vec![
                rule(
                    RetryAction::Ignore,
                    &[FailureClass::Evicted, FailureClass::JobLost],
                    Mutation::default(),
                ),
                rule(
                    RetryAction::Retry,
                    &[FailureClass::Oom],
                    Mutation {
                        memory_factor: Factor::new(1.5),
                        ..Mutation::default()
                    },
                ),
                rule(
                    RetryAction::Retry,
                    &[FailureClass::CudaOom],
                    Mutation {
                        next_gpu_class: true,
                        ..Mutation::default()
                    },
                ),
                rule(
                    RetryAction::Retry,
                    &[FailureClass::Xid],
                    Mutation {
                        avoid_failed_node: true,
                        ..Mutation::default()
                    },
                ),
                rule(
                    RetryAction::Fail,
                    &[FailureClass::LaunchRejected, FailureClass::ImagePull],
                    Mutation::default(),
                ),
            ],
            max_memory: Memory::from_gib(1024),
            max_ignored_attempts: 10,
        }
    }
}

/// A failed attempt, as far as a policy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptFailure {
    pub class: FailureClass,
    pub exit_code: Option<i32>,
    /// The node it ran on, when known.
    pub node: Option<String>,
}

/// How many retries a task has had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetryCount {
    /// Counted against `max_retries`.
    pub counted: u32,
    /// `ignore`d (free) ones.
    pub ignored: u32,
}

/// Which rule decided, for the attempt list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The task's rule at this index.
    Task(usize),
    /// The operator's default rule at this index.
    Default(usize),
    /// No rule matched: failures retry.
    NoRule,
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Task(index) => write!(f, "retry_policy.rules[{index}]"),
            Self::Default(index) => write!(f, "the default rule {index}"),
            Self::NoRule => f.write_str("no rule matched"),
        }
    }
}

/// What happens after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A new attempt: `counted` against `max_retries` or free, with `mutation`.
    Retry {
        counted: bool,
        mutation: Mutation,
        by: DecidedBy,
    },
    /// The task fails with this attempt's outcome.
    Fail { why: String, by: DecidedBy },
}

impl Verdict {
    /// The action taken, for the attempt list.
    #[must_use]
    pub fn action(&self) -> RetryAction {
        match self {
            Self::Retry { counted: true, .. } => RetryAction::Retry,
            Self::Retry { counted: false, .. } => RetryAction::Ignore,
            Self::Fail { .. } => RetryAction::Fail,
        }
    }
}

/// Judges a failed attempt of a task allowed `max_retries` with `policy`, having used
/// `used`.
#[must_use]
pub fn judge(
    policy: Option<&RetryPolicy>,
    defaults: &RetryDefaults,
    failure: &AttemptFailure,
    max_retries: u32,
    used: RetryCount,
) -> Verdict {
    let task_rules = policy.map_or(&[][..], |p| p.rules.as_slice());
    let (rule, by) = task_rules
        .iter()
        .enumerate()
        .find(|(_, rule)| rule.matches(failure))
        .map(|(index, rule)| (Some(rule), DecidedBy::Task(index)))
        .or_else(|| {
            defaults
                .rules
                .iter()
                .enumerate()
                .find(|(_, rule)| rule.matches(failure))
                .map(|(index, rule)| (Some(rule), DecidedBy::Default(index)))
        })
        .unwrap_or((None, DecidedBy::NoRule));
    let action = rule.map_or(RetryAction::Retry, |rule| rule.action);
    let mutation = rule.map(|rule| rule.mutate).unwrap_or_default();
    let counted_retry = || {
        if used.counted < max_retries {
            Verdict::Retry {
                counted: true,
                mutation,
                by,
            }
        } else {
            Verdict::Fail {
                why: format!("no retries left (max_retries {max_retries})"),
                by,
            }
        }
    };
    match action {
        RetryAction::Fail => Verdict::Fail {
            why: format!("{by} fails on {}", failure.class),
            by,
        },
        RetryAction::Ignore if used.ignored < defaults.max_ignored_attempts => Verdict::Retry {
            counted: false,
            mutation,
            by,
        },
        RetryAction::Ignore | RetryAction::Retry => counted_retry(),
    }
}

/// How long the task waits before attempt `attempt + 1`, after `retries` earlier retries
/// (counted or not): the base doubled per retry, capped, jittered into `[d/2, d]` by
/// `seed` (derived from the task and attempt, see [`jitter_seed`]).
#[must_use]
pub fn backoff(
    policy: Option<&RetryPolicy>,
    defaults: &RetryDefaults,
    retries: u32,
    seed: u64,
) -> Duration {
    let base = policy
        .and_then(|p| p.backoff_seconds)
        .unwrap_or(defaults.backoff_seconds);
    let cap = policy
        .and_then(|p| p.max_backoff_seconds)
        .unwrap_or(defaults.max_backoff_seconds)
        .max(base);
    let doubled = u64::from(base).saturating_mul(1u64 << retries.min(32));
    let full_ms = doubled.min(u64::from(cap)) * 1000;
    // Equal jitter: half fixed, half spread, so retries of many tasks that failed together
    // do not come back together.
    let half = full_ms / 2;
    let spread = if half == 0 { 0 } else { seed % (half + 1) };
    Duration::from_millis(full_ms - half + spread)
}

/// A stable pseudo-random value from a task id and attempt (FNV-1a): the jitter of that
/// attempt's backoff.
#[must_use]
pub fn jitter_seed(task_id: &[u8], attempt: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in task_id.iter().chain(attempt.to_le_bytes().iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// What the next attempt changes, and why, in words for the attempt list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The new memory request.
    pub memory: Option<Memory>,
    /// The new GPU class.
    pub gpu_class: Option<String>,
    /// The nodes to avoid from now on (the whole list), when it grew.
    pub avoid_nodes: Option<Vec<String>>,
    /// One line per change (or per change that could not be made).
    pub notes: Vec<String>,
}

/// What the attempt a task is about to retry asks for now.
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    pub memory: Option<Memory>,
    /// The GPU class it ran on and how many GPUs, when it has GPUs.
    pub gpu: Option<(&'a str, u32)>,
    pub avoided_nodes: &'a [String],
}

/// Plans what `mutation` changes for the next attempt of a task that asks for `current`
/// and failed with `failure`.
#[must_use]
pub fn plan_changes(
    mutation: &Mutation,
    failure: &AttemptFailure,
    current: Current<'_>,
    defaults: &RetryDefaults,
    classes: &GpuClasses,
) -> Changes {
    let mut changes = Changes::default();
    let why = failure.class;
    if let Some(factor) = mutation.memory_factor {
        match current.memory {
            Some(memory) => {
                let grown = (memory.bytes() as f64 * factor.get()) as u64;
                let capped = grown.min(defaults.max_memory.bytes());
                // Whole MiB, as Kubernetes users write it.
                let mib = 1024 * 1024;
                let rounded = capped.div_ceil(mib) * mib;
                let rounded = rounded.min(defaults.max_memory.bytes());
                match Memory::from_bytes(rounded).filter(|new| new.bytes() > memory.bytes()) {
                    Some(new) => {
                        changes.memory = Some(new);
                        changes.notes.push(format!(
                            "memory {memory} → {new} ({why}, ×{})",
                            factor.get()
                        ));
                    }
                    None => changes.notes.push(format!(
                        "memory stays {memory}: the most a retry may ask is {} ({why})",
                        defaults.max_memory
                    )),
                }
            }
            None => changes.notes.push(format!(
                "memory unchanged: the task requests none, so there is nothing to grow ({why})"
            )),
        }
    }
    if mutation.next_gpu_class {
        match current.gpu {
            Some((class, count)) => match classes.next_with_more_memory(class, count) {
                Some(next) => {
                    changes.gpu_class = Some(next.name.clone());
                    changes
                        .notes
                        .push(format!("GPU class {class} → {} ({why})", next.name));
                }
                None => changes.notes.push(format!(
                    "GPU class stays {class}: no class with more memory per GPU follows it ({why})"
                )),
            },
            None => changes.notes.push(format!(
                "no GPU class to change: the task has no GPUs ({why})"
            )),
        }
    }
    if mutation.avoid_failed_node {
        match &failure.node {
            Some(node) if current.avoided_nodes.contains(node) => {
                changes
                    .notes
                    .push(format!("still avoids node {node} ({why})"));
            }
            Some(node) => {
                let mut nodes: Vec<String> = current.avoided_nodes.to_vec();
                nodes.push(node.clone());
                let excess = nodes.len().saturating_sub(MAX_AVOIDED_NODES);
                nodes.drain(..excess);
                changes.avoid_nodes = Some(nodes);
                changes.notes.push(format!("avoids node {node} ({why})"));
            }
            None => changes.notes.push(format!(
                "no node to avoid: the failed node is unknown ({why})"
            )),
        }
    }
    changes
}
