//! Which Jobs may go: the pure half of the watcher's Job collection. Once a task's
//! outcome is recorded its Job has done its work; kept for `--keep-finished-jobs` (for
//! `kubectl` users), it is then deleted, and so are the Jobs of attempts that are no
//! longer their task's current one. A Job still running for an ended task (cancelled,
//! heartbeat lost) goes at once: its pod may hold a GPU.
//!
//! Invariants:
//! - a Job is deleted only after its task was read from the store and shows it ended or
//!   superseded; a Job of a task the store does not know is never touched (another
//!   installation may share the namespace);
//! - the decision depends on the cluster and the store only, never on memory, so the
//!   sweep that runs it again and again after a failed delete or a kill -9 converges.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt as _;

use crate::launcher::job_spec::{LABEL_ATTEMPT, LABEL_TASK_ID};
use crate::metrics::JobDeletion;
use crate::task::{TaskId, TaskSummary};

/// What the sweep knows of one agent-bus Job from the cluster alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobFacts {
    pub task_id: TaskId,
    pub attempt: u32,
    /// When its `Complete` or `Failed` condition was set; `None` while it runs.
    pub finished_at: Option<jiff::Timestamp>,
    /// Its delete was accepted already.
    pub deleting: bool,
}

impl JobFacts {
    /// The facts of `job`; `None` when its labels do not name a task and an attempt.
    #[must_use]
    pub fn of(job: &Job) -> Option<Self> {
        let labels = job.labels();
        let task_id = labels
            .get(LABEL_TASK_ID)
            .and_then(|id| uuid::Uuid::try_parse(id).ok())
            .map(TaskId)?;
        let attempt = labels.get(LABEL_ATTEMPT)?.parse().ok()?;
        let finished_at = job
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .and_then(|conditions| {
                conditions
                    .iter()
                    .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
            })
            .map(|condition| {
                // A condition without a time: count it finished since the Job's creation.
                condition
                    .last_transition_time
                    .as_ref()
                    .or(job.metadata.creation_timestamp.as_ref())
                    .map_or(jiff::Timestamp::UNIX_EPOCH, |t| t.0)
            });
        Some(Self {
            task_id,
            attempt,
            finished_at,
            deleting: job.metadata.deletion_timestamp.is_some(),
        })
    }
}

/// What to do with one Job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Leave it.
    Keep,
    /// Read its task to decide ([`after_reading`]).
    ReadTask,
    /// Delete it, for this reason.
    Delete(JobDeletion),
}

/// `at` plus `keep` has passed by `now`.
fn kept_long_enough(at: jiff::Timestamp, keep: Duration, now: jiff::Timestamp) -> bool {
    at.checked_add(jiff::SignedDuration::try_from(keep).unwrap_or(jiff::SignedDuration::MAX))
        .is_ok_and(|until| until <= now)
}

/// The first look, without the store: `live` is the current attempt of the task if the
/// sweep just saw it launching, launched or running. Only a Job that may have to go
/// costs a store read.
#[must_use]
pub fn before_reading(
    job: &JobFacts,
    live: Option<u32>,
    keep: Duration,
    now: jiff::Timestamp,
) -> Verdict {
    if job.deleting || live == Some(job.attempt) {
        return Verdict::Keep;
    }
    match job.finished_at {
        Some(at) if !kept_long_enough(at, keep, now) => Verdict::Keep,
        _ => Verdict::ReadTask,
    }
}

/// The decision, with the Job's `task` as the store has it (`None`: unknown there).
#[must_use]
pub fn after_reading(
    job: &JobFacts,
    task: Option<&TaskSummary>,
    keep: Duration,
    now: jiff::Timestamp,
) -> Verdict {
    let Some(task) = task else {
        return Verdict::Keep;
    };
    if task.attempt > job.attempt {
        // An attempt that is over: a fallback or a retry took its place. A finished one
        // is here only once kept long enough (see `before_reading`).
        return Verdict::Delete(JobDeletion::Superseded);
    }
    if task.attempt < job.attempt || !task.state.is_terminal() {
        // Its task's current Job (or one from an attempt the store has not reached).
        return Verdict::Keep;
    }
    if job.finished_at.is_none() {
        return Verdict::Delete(JobDeletion::TaskEnded);
    }
    let recorded = task.timeline.finished_at.unwrap_or(task.updated_at);
    if kept_long_enough(recorded, keep, now) {
        Verdict::Delete(JobDeletion::OutcomeRecorded)
    } else {
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::{JobFacts, Verdict, after_reading, before_reading};
    use crate::metrics::JobDeletion;
    use crate::task::TaskState;
    use crate::task::fixtures::TaskFixture;

    fn at(seconds: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn facts_come_from_labels_and_conditions() {
        let id = crate::task::TaskId::new();
        let job: k8s_openapi::api::batch::v1::Job = serde_json::from_value(json!({
            "metadata": {"name": "j", "labels": {"agent-bus.io/task-id": id.simple(), "agent-bus.io/attempt": "2"}},
            "status": {"conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": at(5).to_string()}]}
        }))
        .unwrap();
        let facts = JobFacts::of(&job).unwrap();
        assert_eq!((facts.task_id, facts.attempt), (id, 2));
        assert_eq!(facts.finished_at, Some(at(5)));
        assert!(!facts.deleting);
        let running: k8s_openapi::api::batch::v1::Job = serde_json::from_value(json!({
            "metadata": {"name": "j", "labels": {"agent-bus.io/task-id": id.simple(), "agent-bus.io/attempt": "1"},
                "deletionTimestamp": at(1).to_string()},
            "status": {"conditions": [{"type": "Failed", "status": "False"}]}
        }))
        .unwrap();
        let facts = JobFacts::of(&running).unwrap();
        assert_eq!((facts.finished_at, facts.deleting), (None, true));
        let unlabelled: k8s_openapi::api::batch::v1::Job =
            serde_json::from_value(json!({"metadata": {"name": "j"}})).unwrap();
        assert_eq!(JobFacts::of(&unlabelled), None);
    }

    #[test]
    fn table() {
        use JobDeletion::{OutcomeRecorded, Superseded, TaskEnded};
        use Verdict::{Delete, Keep, ReadTask};
        let id = crate::task::TaskId::new();
        let job = |attempt: u32, finished_at: Option<i64>| JobFacts {
            task_id: id,
            attempt,
            finished_at: finished_at.map(at),
            deleting: false,
        };
        let task = |attempt: u32, state: TaskState, finished_at: Option<i64>| {
            let mut task = TaskFixture::new().obj();
            task.id = id;
            task.attempt = attempt;
            task.state = state;
            task.timeline.finished_at = finished_at.map(at);
            task
        };
        let none = Duration::ZERO;
        let minute = Duration::from_mins(1);
        let now = at(100);

        // (job, live attempt, keep) -> first look
        let first = [
            (job(1, None), Some(1), none, Keep),
            (job(1, Some(90)), Some(1), none, Keep),
            (job(1, None), None, none, ReadTask),
            (job(1, None), Some(2), minute, ReadTask),
            (job(1, Some(90)), None, none, ReadTask),
            (job(1, Some(90)), None, minute, Keep),
            (job(1, Some(30)), None, minute, ReadTask),
            (
                JobFacts {
                    deleting: true,
                    ..job(1, None)
                },
                None,
                none,
                Keep,
            ),
        ];
        for (row, (facts, live, keep, expected)) in first.into_iter().enumerate() {
            assert_eq!(
                before_reading(&facts, live, keep, now),
                expected,
                "first look, row {row}"
            );
        }

        // (job, task, keep) -> decision
        let decided = [
            // Outcome recorded: delete at once, or once kept long enough.
            (
                job(1, Some(90)),
                Some(task(1, TaskState::Succeeded, Some(95))),
                none,
                Delete(OutcomeRecorded),
            ),
            (
                job(1, Some(30)),
                Some(task(1, TaskState::Failed, Some(60))),
                minute,
                Keep,
            ),
            (
                job(1, Some(30)),
                Some(task(1, TaskState::Failed, Some(35))),
                minute,
                Delete(OutcomeRecorded),
            ),
            // Still running for a task that ended: at once, whatever the keep.
            (
                job(1, None),
                Some(task(1, TaskState::Cancelled, Some(99))),
                minute,
                Delete(TaskEnded),
            ),
            // An attempt that is no longer current.
            (
                job(1, None),
                Some(task(2, TaskState::Launched, None)),
                minute,
                Delete(Superseded),
            ),
            (
                job(1, Some(10)),
                Some(task(3, TaskState::Queued, None)),
                minute,
                Delete(Superseded),
            ),
            // The task's own live Job, a Job ahead of the store, an unknown task.
            (
                job(1, None),
                Some(task(1, TaskState::Running, None)),
                none,
                Keep,
            ),
            (
                job(1, Some(90)),
                Some(task(1, TaskState::Launched, None)),
                none,
                Keep,
            ),
            (
                job(2, None),
                Some(task(1, TaskState::Failed, Some(1))),
                none,
                Keep,
            ),
            (job(1, Some(1)), None, none, Keep),
        ];
        for (row, (facts, task, keep, expected)) in decided.into_iter().enumerate() {
            assert_eq!(
                after_reading(
                    &facts,
                    task.as_ref().map(crate::task::TaskSummary::from).as_ref(),
                    keep,
                    now
                ),
                expected,
                "decision, row {row}"
            );
        }
    }
}
