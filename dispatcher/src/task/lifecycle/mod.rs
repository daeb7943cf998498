//! The task state machine: every move a task can make, from which states, to which
//! state, with which reasons, and which timestamps each move sets. Pure: it plans a move
//! as plain values ([`Step`], [`PlannedNote`]); the store writes those values with a
//! compare-and-set on the state, and [`crate::lifecycle`] is the one place that asks it to.
//!
//! Invariants:
//! - a move is planned only from the states its rule lists ([`Move::sources`]), and every
//!   such step is an edge of [`TaskState::can_move_to`];
//! - a reason only travels with a state it explains ([`Reason::fits`]);
//! - the stage timestamps follow one rule ([`Stamps::entering`]): entering `queued` (a new
//!   attempt) restarts the timeline, `launched`/`running` record when they were first
//!   reached, a terminal state records when it was reached;
//! - a note (why a task waits, without a state change) never touches a terminal task.

use std::fmt;

use super::retry::{FailureClass, RetryCount};
use super::{AttemptRecord, Breakdown, Reason, TaskSpec, TaskState};

/// A move of a task, named for what happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Move {
    /// A launcher takes the queued task to create its Job (or process).
    Claim,
    /// Its Job exists (a launcher created it, or the watcher saw it).
    Launched,
    /// Its command runs: a pod runs, the runner said it started, or the local process
    /// started.
    Started,
    /// The attempt ended on its own: succeeded, failed or timed out.
    Ended(Ending),
    /// Kubernetes (or the local executor) can never launch it.
    LaunchRejected { message: String },
    /// The tenant cancelled it.
    Cancel,
    /// No node of its GPU class took its pod in time: a new attempt on `class`, the next
    /// fallback, waits in the queue.
    FallBack {
        class: String,
        attempt: u32,
        message: String,
    },
    /// What ran it is gone without an outcome: its Job disappeared, or the dispatcher that
    /// ran it as a local process stopped.
    Lost { message: String },
    /// Its runner stopped sending heartbeats, and the operator asked to fail such tasks.
    HeartbeatLost { message: String },
    /// It waited in its queue (or for room in the cluster) past its queue TTL and was
    /// never launched.
    Expire { message: String },
    /// Its attempt failed and the retry policy gives it another: attempt `next.attempt`
    /// waits in the queue until `next.not_before`.
    Retry {
        next: Box<NextAttempt>,
        message: String,
    },
}

/// What the attempt after a failed one is: its number, when it may start, and what it
/// changes. The lifecycle plans it from the retry policy ([`super::retry`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NextAttempt {
    pub attempt: u32,
    /// The retries used, this one included.
    pub retries: RetryCount,
    /// The end of its backoff.
    pub not_before: jiff::Timestamp,
    /// When it expires if it is still queued then (`None`: never).
    pub expires_at: Option<jiff::Timestamp>,
    /// The spec with its memory grown, when it grew.
    pub spec: Option<TaskSpec>,
    /// Its GPU class, when it changed.
    pub gpu_class: Option<String>,
    /// The nodes to avoid, when the list grew.
    pub avoid_nodes: Option<Vec<String>>,
    /// The compute cost of every attempt before it.
    pub earlier_attempts: Breakdown,
}

/// How an attempt ended, as the watcher, the runner or the local executor observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// `succeeded`, `failed` or `timed_out`.
    pub state: TaskState,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    /// Why it failed, when whoever saw it knows better than the reason tells (the runner's
    /// class: a signal, CUDA OOM, an Xid).
    pub class: Option<FailureClass>,
    /// The node it ran on, when known.
    pub node: Option<String>,
}

impl Ending {
    /// Ended in `state` with nothing more to say.
    #[must_use]
    pub fn new(state: TaskState) -> Self {
        Self {
            state,
            reason: None,
            message: None,
            exit_code: None,
            class: None,
            node: None,
        }
    }

    #[must_use]
    pub fn class(mut self, class: FailureClass) -> Self {
        self.class = Some(class);
        self
    }

    #[must_use]
    pub fn node(mut self, node: Option<String>) -> Self {
        self.node = node;
        self
    }

    #[must_use]
    pub fn reason(mut self, reason: Reason) -> Self {
        self.reason = Some(reason);
        self
    }

    #[must_use]
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    #[must_use]
    pub fn exit_code(mut self, exit_code: i32) -> Self {
        self.exit_code = Some(exit_code);
        self
    }
}

/// The kind of a [`Move`], without its data: the key of the rule table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveKind {
    Claim,
    Launched,
    Started,
    Ended,
    LaunchRejected,
    Cancel,
    FallBack,
    Lost,
    HeartbeatLost,
    Expire,
    Retry,
}

impl MoveKind {
    pub const ALL: [Self; 11] = [
        Self::Claim,
        Self::Launched,
        Self::Started,
        Self::Ended,
        Self::LaunchRejected,
        Self::Cancel,
        Self::FallBack,
        Self::Lost,
        Self::HeartbeatLost,
        Self::Expire,
        Self::Retry,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::Launched => "launched",
            Self::Started => "started",
            Self::Ended => "ended",
            Self::LaunchRejected => "launch_rejected",
            Self::Cancel => "cancel",
            Self::FallBack => "fall_back",
            Self::Lost => "lost",
            Self::HeartbeatLost => "heartbeat_lost",
            Self::Expire => "expire",
            Self::Retry => "retry",
        }
    }

    /// The one table of moves: the states a move may start from.
    #[must_use]
    // One row per move reads as the table, even where two rows agree.
    #[allow(clippy::match_same_arms)]
    pub fn sources(self) -> &'static [TaskState] {
        use TaskState::{Launched, Launching, Queued, Running};
        match self {
            Self::Claim => &[Queued],
            // Launching: a claimed task the cluster's quota had no room for, not launched
            // within its queue TTL either.
            Self::Expire => &[Queued, Launching],
            Self::Launched | Self::LaunchRejected => &[Launching],
            Self::Started => &[Launching, Launched],
            Self::Ended | Self::Lost | Self::Retry => &[Launching, Launched, Running],
            Self::Cancel => &[Queued, Launching, Launched, Running],
            Self::FallBack => &[Launching, Launched],
            Self::HeartbeatLost => &[Running],
        }
    }

    /// The states a move may reach (several for [`Move::Ended`]).
    #[must_use]
    pub fn targets(self) -> &'static [TaskState] {
        use TaskState::{
            Cancelled, Expired, Failed, Launched, Launching, Queued, Running, Succeeded, TimedOut,
        };
        match self {
            Self::Claim => &[Launching],
            Self::Launched => &[Launched],
            Self::Started => &[Running],
            Self::Ended => &[Succeeded, Failed, TimedOut],
            Self::LaunchRejected | Self::Lost | Self::HeartbeatLost => &[Failed],
            Self::Cancel => &[Cancelled],
            Self::FallBack | Self::Retry => &[Queued],
            Self::Expire => &[Expired],
        }
    }
}

impl fmt::Display for MoveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Move {
    #[must_use]
    pub fn kind(&self) -> MoveKind {
        match self {
            Self::Claim => MoveKind::Claim,
            Self::Launched => MoveKind::Launched,
            Self::Started => MoveKind::Started,
            Self::Ended(_) => MoveKind::Ended,
            Self::LaunchRejected { .. } => MoveKind::LaunchRejected,
            Self::Cancel => MoveKind::Cancel,
            Self::FallBack { .. } => MoveKind::FallBack,
            Self::Lost { .. } => MoveKind::Lost,
            Self::HeartbeatLost { .. } => MoveKind::HeartbeatLost,
            Self::Expire { .. } => MoveKind::Expire,
            Self::Retry { .. } => MoveKind::Retry,
        }
    }

    /// The state this move reaches.
    #[must_use]
    pub fn target(&self) -> TaskState {
        match self {
            Self::Claim => TaskState::Launching,
            Self::Launched => TaskState::Launched,
            Self::Started => TaskState::Running,
            Self::Ended(ending) => ending.state,
            Self::LaunchRejected { .. } | Self::Lost { .. } | Self::HeartbeatLost { .. } => {
                TaskState::Failed
            }
            Self::Cancel => TaskState::Cancelled,
            Self::FallBack { .. } | Self::Retry { .. } => TaskState::Queued,
            Self::Expire { .. } => TaskState::Expired,
        }
    }

    /// Plans this move of a task that is in `from` now, at `at`: the values the store
    /// writes, or why the move is illegal.
    pub fn plan(self, from: TaskState, at: jiff::Timestamp) -> Result<Step, IllegalMove> {
        let kind = self.kind();
        let to = self.target();
        let illegal = |why| IllegalMove {
            step: kind.as_str(),
            from,
            to,
            why,
        };
        if !kind.sources().contains(&from) {
            return Err(illegal(Why::NotFromThisState));
        }
        if !kind.targets().contains(&to) {
            return Err(illegal(Why::NotToThisState));
        }
        let mut next_attempt = None;
        let (reason, message, exit_code, new_attempt, gpu_class) = match self {
            Self::Claim | Self::Launched | Self::Started => (None, None, None, None, None),
            Self::Ended(ending) => (ending.reason, ending.message, ending.exit_code, None, None),
            Self::LaunchRejected { message } => (
                Some(Reason::LaunchRejected),
                Some(message),
                None,
                None,
                None,
            ),
            Self::Cancel => (
                Some(Reason::CancelledByUser),
                Some("cancelled through the API".to_owned()),
                None,
                None,
                None,
            ),
            Self::FallBack {
                class,
                attempt,
                message,
            } => (
                Some(Reason::FellBack),
                Some(message),
                None,
                Some(attempt),
                Some(class),
            ),
            Self::Lost { message } => (Some(Reason::JobLost), Some(message), None, None, None),
            Self::HeartbeatLost { message } => {
                (Some(Reason::HeartbeatLost), Some(message), None, None, None)
            }
            Self::Expire { message } => (Some(Reason::QueueTtl), Some(message), None, None, None),
            Self::Retry { next, message } => {
                let (attempt, class) = (next.attempt, next.gpu_class.clone());
                next_attempt = Some(next);
                (
                    Some(Reason::Retrying),
                    Some(message),
                    None,
                    Some(attempt),
                    class,
                )
            }
        };
        if let Some(reason) = reason
            && !reason.fits(to)
        {
            return Err(illegal(Why::ReasonDoesNotFit(reason)));
        }
        Ok(Step {
            from,
            to,
            reason,
            message,
            exit_code,
            stamps: Stamps::entering(to),
            attempt: new_attempt,
            gpu_class,
            at,
            claimable_only: kind == MoveKind::Claim,
            within_quota: kind == MoveKind::Claim,
            expected_attempt: None,
            next_attempt,
            ended_attempt: None,
        })
    }

    /// Whether this move, from `from`, ends the attempt in progress (so it leaves a row
    /// in the task's attempt list). A queued task has no attempt in progress.
    #[must_use]
    pub fn ends_attempt(&self, from: TaskState) -> bool {
        from != TaskState::Queued
            && matches!(
                self.kind(),
                MoveKind::Ended
                    | MoveKind::LaunchRejected
                    | MoveKind::Cancel
                    | MoveKind::FallBack
                    | MoveKind::Lost
                    | MoveKind::HeartbeatLost
                    | MoveKind::Retry
            )
    }

    /// The failure this move records, for the retry policy; `None` when it is not a
    /// failure (success, cancel, fallback, expiry).
    #[must_use]
    pub fn failure(&self) -> Option<super::retry::AttemptFailure> {
        use super::retry::AttemptFailure;
        let plain = |class| {
            Some(AttemptFailure {
                class,
                exit_code: None,
                node: None,
            })
        };
        match self {
            Self::Ended(ending)
                if matches!(ending.state, TaskState::Failed | TaskState::TimedOut) =>
            {
                Some(AttemptFailure {
                    class: ending
                        .class
                        .unwrap_or_else(|| FailureClass::of_reason(ending.reason)),
                    exit_code: ending.exit_code,
                    node: ending.node.clone(),
                })
            }
            Self::LaunchRejected { .. } => plain(FailureClass::LaunchRejected),
            Self::Lost { .. } => plain(FailureClass::JobLost),
            Self::HeartbeatLost { .. } => plain(FailureClass::HeartbeatLost),
            _ => None,
        }
    }
}

/// A move the state machine refuses; nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a task in {from} cannot make the move '{step}' to {to}: {why}")]
pub struct IllegalMove {
    /// The move's name ([`MoveKind::as_str`]), or `note`.
    pub step: &'static str,
    pub from: TaskState,
    pub to: TaskState,
    pub why: Why,
}

/// Why a move is illegal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The move does not start from the task's state (a terminal task never moves).
    NotFromThisState,
    /// The move cannot reach that state (an ending that is not an outcome).
    NotToThisState,
    /// The reason does not explain the target state.
    ReasonDoesNotFit(Reason),
    /// Notes are for tasks that still wait or run.
    NoteOnTerminal,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFromThisState => f.write_str("the move does not start from this state"),
            Self::NotToThisState => f.write_str("the move does not reach this state"),
            Self::ReasonDoesNotFit(reason) => write!(f, "reason {reason} does not fit the state"),
            Self::NoteOnTerminal => f.write_str("a finished task keeps its outcome"),
        }
    }
}

/// What a move writes to one stage timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// Left as it is.
    Keep,
    /// Set to the move's time.
    Now,
    /// Set to the move's time unless it is already set (the first time reached wins).
    NowIfUnset,
    /// Cleared (a new attempt has not reached that stage yet).
    Clear,
}

/// What a move writes to each stage timestamp of the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamps {
    pub queued_at: Stamp,
    pub launched_at: Stamp,
    pub started_at: Stamp,
    pub finished_at: Stamp,
}

impl Stamps {
    /// The timestamp rule of a move into `to` (it depends on the state reached only).
    #[must_use]
    pub fn entering(to: TaskState) -> Self {
        let keep = Self {
            queued_at: Stamp::Keep,
            launched_at: Stamp::Keep,
            started_at: Stamp::Keep,
            finished_at: Stamp::Keep,
        };
        match to {
            // A new attempt: its timeline starts again at the queue.
            TaskState::Queued => Self {
                queued_at: Stamp::Now,
                launched_at: Stamp::Clear,
                started_at: Stamp::Clear,
                ..keep
            },
            TaskState::Launching => keep,
            TaskState::Launched => Self {
                launched_at: Stamp::NowIfUnset,
                ..keep
            },
            // A task can start running before its launch was recorded (the local
            // executor, a watcher that saw the pod first): it was launched by then.
            TaskState::Running => Self {
                launched_at: Stamp::NowIfUnset,
                started_at: Stamp::NowIfUnset,
                ..keep
            },
            TaskState::Succeeded
            | TaskState::Failed
            | TaskState::Cancelled
            | TaskState::TimedOut
            | TaskState::Expired => Self {
                finished_at: Stamp::Now,
                ..keep
            },
        }
    }
}

/// A planned step, as values: the store moves the task from `from` to `to` with a
/// compare-and-set on `from`, writes these values and the event row, in one transaction.
/// [`Move::plan`] makes the steps the dispatcher takes; [`Step::new`] makes any step of
/// the state graph (the store's own tests walk tasks with it).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub from: TaskState,
    pub to: TaskState,
    /// Replaces the task's reason, message and exit code (`None` clears them).
    pub reason: Option<Reason>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    pub stamps: Stamps,
    /// A new attempt number, which also forgets the last attempt's heartbeat.
    pub attempt: Option<u32>,
    /// The GPU class of the new attempt.
    pub gpu_class: Option<String>,
    /// When the step happens (every timestamp it sets).
    pub at: jiff::Timestamp,
    /// Only a task whose queue TTL has not run out by `at`, and whose retry backoff has
    /// ended by `at`, may take the step: a launcher never claims a task the expiry sweep
    /// has yet to reach, nor one still backing off.
    pub claimable_only: bool,
    /// Only if the task's tenant quota on running work admits it
    /// ([`super::quota::admit`], checked in the step's transaction under a lock on the
    /// tenant, which the step stamps as last claimed): a claim never takes a tenant past
    /// its quota, whatever the number of launchers.
    pub within_quota: bool,
    /// Only a task at this attempt may take the step (the attempt the caller judged).
    pub expected_attempt: Option<u32>,
    /// The retry's next attempt: its backoff, retry counts, changes and earlier cost.
    pub next_attempt: Option<Box<NextAttempt>>,
    /// The attempt this step ends, for the attempt list.
    pub ended_attempt: Option<AttemptRecord>,
}

impl Step {
    /// A step from `from` to `to` now, with no reason, message or exit code, and the
    /// timestamps of [`Stamps::entering`] `to`.
    #[must_use]
    pub fn new(from: TaskState, to: TaskState) -> Self {
        Self {
            from,
            to,
            reason: None,
            message: None,
            exit_code: None,
            stamps: Stamps::entering(to),
            attempt: None,
            gpu_class: None,
            at: jiff::Timestamp::now(),
            claimable_only: false,
            within_quota: false,
            expected_attempt: None,
            next_attempt: None,
            ended_attempt: None,
        }
    }

    #[must_use]
    pub fn reason(mut self, reason: Reason) -> Self {
        self.reason = Some(reason);
        self
    }

    #[must_use]
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    #[must_use]
    pub fn exit_code(mut self, exit_code: i32) -> Self {
        self.exit_code = Some(exit_code);
        self
    }

    #[must_use]
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }

    #[must_use]
    pub fn gpu_class(mut self, class: impl Into<String>) -> Self {
        self.gpu_class = Some(class.into());
        self
    }
}

/// A planned note: why a task in `state` waits, recorded without a state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedNote {
    pub state: TaskState,
    pub reason: Reason,
    pub message: String,
    pub at: jiff::Timestamp,
}

/// Plans a note on a task in `state`: refused on a terminal task, or with a reason that
/// does not explain a wait in `state`.
pub fn plan_note(
    state: TaskState,
    reason: Reason,
    message: impl Into<String>,
    at: jiff::Timestamp,
) -> Result<PlannedNote, IllegalMove> {
    let illegal = |why| IllegalMove {
        step: "note",
        from: state,
        to: state,
        why,
    };
    if state.is_terminal() {
        return Err(illegal(Why::NoteOnTerminal));
    }
    if !reason.fits(state) {
        return Err(illegal(Why::ReasonDoesNotFit(reason)));
    }
    Ok(PlannedNote {
        state,
        reason,
        message: message.into(),
        at,
    })
}

impl Reason {
    /// Whether this reason explains a task in `state`: the outcome it ended with, why it
    /// waits, or why it went back to the queue.
    #[must_use]
    pub fn fits(self, state: TaskState) -> bool {
        use TaskState::{Cancelled, Failed, Launched, Launching, Queued, Running, TimedOut};
        match self {
            Self::ExitCode
            | Self::BackoffLimit
            | Self::OomKilled
            | Self::ImagePull
            | Self::Evicted
            | Self::LaunchRejected
            | Self::JobLost
            | Self::GpuError
            | Self::GpuOutOfMemory
            | Self::UserError
            | Self::BudgetExhausted => state == Failed,
            Self::DeadlineExceeded => matches!(state, TimedOut | Failed),
            Self::Unschedulable => matches!(state, Launching | Launched),
            Self::HeartbeatLost => matches!(state, Running | Failed),
            Self::CancelledByUser => state == Cancelled,
            Self::FellBack | Self::Retrying | Self::TenantQuota => state == Queued,
            Self::ClusterQuota => matches!(state, Queued | Launching | Launched),
            Self::QueueTtl => state == TaskState::Expired,
        }
    }
}

#[cfg(test)]
mod tests;
