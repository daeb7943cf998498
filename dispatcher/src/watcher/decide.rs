//! The pure heart of the watcher: from what the cluster shows about a task's Job and
//! pods, what should happen to the task. No I/O; table-tested.
//!
//! Invariants: a decision only moves a task along [`TaskState::can_move_to`]; Job
//! conditions (`Complete`, `Failed`) are final and win over pod phases; the exit code and
//! reason come from the task container's terminated state. A Job whose pods Kubernetes
//! refuses to create has no pod to read: [`refused_pods`] reads the Job controller's
//! `FailedCreate` events instead.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Event, Pod};

use protocol::TerminationSummary;

use crate::launcher::job_spec::TASK_CONTAINER;
use crate::report::outcome_of;
use crate::task::lifecycle::{Ending, Move};
use crate::task::retry::FailureClass;
use crate::task::{Reason, TaskState, TaskSummary};

/// What the watcher should do for one task.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Nothing,
    /// Move the task (CAS from its current state).
    Move(Move),
    /// The task is over but its Job still runs (a cancel whose delete failed): delete it.
    DeleteJob,
    /// No state change, but a reason worth showing (a pod that cannot be scheduled).
    Note {
        reason: Reason,
        message: String,
    },
    /// No node of the task's GPU class took its pod in time: start a new attempt on
    /// `class`, the next fallback.
    FallBack {
        class: String,
        message: String,
    },
}

/// Where a task whose pod cannot be scheduled may go next, and after how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub class: String,
    pub after: Duration,
}

/// The attempt ended in `state`.
fn ended(
    state: TaskState,
    reason: Option<Reason>,
    message: Option<String>,
    exit_code: Option<i32>,
) -> Decision {
    let mut ending = Ending::new(state);
    ending.reason = reason;
    ending.message = message;
    ending.exit_code = exit_code;
    Decision::Move(Move::Ended(ending))
}

/// The node `pod` is bound to, if any.
fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// The node the attempt's pod ran on: the pod whose task container terminated last, else
/// any pod bound to a node.
fn node_of(pods: &[&Pod]) -> Option<String> {
    let latest = pods
        .iter()
        .filter(|pod| node_name(pod).is_some())
        .max_by_key(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|statuses| statuses.iter().find(|s| s.name == TASK_CONTAINER))
                .and_then(|s| s.state.as_ref()?.terminated.as_ref()?.started_at.as_ref())
                .map(|time| time.0)
        })?;
    node_name(latest).map(str::to_owned)
}

/// Whether no pod of the attempt was ever bound to a node.
fn never_scheduled(pods: &[&Pod]) -> bool {
    pods.iter().all(|pod| node_name(pod).is_none())
}

/// Sets the failure class and node of an attempt's ending.
fn with_failure(decision: Decision, class: Option<FailureClass>, node: Option<String>) -> Decision {
    match decision {
        Decision::Move(Move::Ended(mut ending)) => {
            if class.is_some() {
                ending.class = class;
            }
            ending.node = node;
            Decision::Move(Move::Ended(ending))
        }
        other => other,
    }
}

/// The runner's summary in the task container's termination message, if it left one.
#[must_use]
pub fn termination_summary(pods: &[&Pod]) -> Option<TerminationSummary> {
    terminated(pods)?
        .message
        .as_deref()
        .and_then(TerminationSummary::from_message)
}

fn job_condition<'a>(
    job: &'a Job,
    type_: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

pub(super) fn job_is_finished(job: &Job) -> bool {
    job_condition(job, "Complete").is_some() || job_condition(job, "Failed").is_some()
}

/// The terminated state of the task container in the most recently started pod.
fn terminated(pods: &[&Pod]) -> Option<ContainerStateTerminated> {
    pods.iter()
        .filter_map(|pod| {
            let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
            let status = statuses.iter().find(|s| s.name == TASK_CONTAINER)?;
            status.state.as_ref()?.terminated.clone()
        })
        .max_by_key(|t| t.started_at.as_ref().map(|time| time.0))
}

fn failure_from_pods(pods: &[&Pod], job_message: Option<String>) -> Decision {
    let evicted = pods
        .iter()
        .any(|pod| pod.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("Evicted"));
    match terminated(pods) {
        Some(t) if t.reason.as_deref() == Some("OOMKilled") => ended(
            TaskState::Failed,
            Some(Reason::OomKilled),
            Some("the container used more memory than it requested and was killed".to_owned()),
            Some(t.exit_code),
        ),
        Some(t) => {
            if let Some(summary) = t
                .message
                .as_deref()
                .and_then(TerminationSummary::from_message)
                && let Some(class) = summary.outcome.failure_class
            {
                let (to, reason) = outcome_of(class);
                let tail = summary
                    .outcome
                    .stderr_tail
                    .as_deref()
                    .map(str::trim)
                    .filter(|tail| !tail.is_empty());
                let message = match tail {
                    Some(tail) => format!("exit code {} ({}): {tail}", t.exit_code, class.as_str()),
                    None => format!("exit code {} ({})", t.exit_code, class.as_str()),
                };
                return with_failure(
                    ended(to, Some(reason), Some(message), Some(t.exit_code)),
                    Some(FailureClass::from_runner(class)),
                    None,
                );
            }
            let detail = t.message.filter(|m| !m.trim().is_empty());
            let message = match detail {
                Some(detail) => format!("exit code {}: {}", t.exit_code, detail.trim()),
                None => format!("exit code {}", t.exit_code),
            };
            ended(
                TaskState::Failed,
                Some(Reason::ExitCode),
                Some(message),
                Some(t.exit_code),
            )
        }
        None if evicted => ended(TaskState::Failed, Some(Reason::Evicted), job_message, None),
        None => ended(
            TaskState::Failed,
            Some(Reason::BackoffLimit),
            job_message,
            None,
        ),
    }
}

/// Whether the scheduler's "why not" is about GPU capacity or the class's nodes (another
/// class may have room), not about volumes (which no other class would fix).
fn another_class_could_help(message: &str) -> bool {
    let about_volumes = message.contains("persistentvolumeclaim")
        || message.contains("volume node affinity")
        || message.contains("unbound immediate PersistentVolumeClaims");
    let about_capacity = message.contains("Insufficient")
        || message.contains("didn't match Pod's node affinity/selector")
        || message.contains("untolerated taint");
    about_capacity && !about_volumes
}

/// Pod waiting reasons that mean the image will not come.
const IMAGE_PULL_FAILURES: [&str; 3] =
    ["ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"];

/// The kubelet's waiting reason for a container it cannot configure: with agent-bus, a
/// Secret (or key) a `secretKeyRef` names is gone, since the tenant deleted its secret
/// (or rewrote it without the key) after the Job was made. The kubelet keeps trying, but
/// nothing the task can do brings the secret back: the attempt fails at once.
const CONTAINER_CONFIG_ERROR: &str = "CreateContainerConfigError";

/// The task's message for a container the kubelet cannot configure, from the kubelet's
/// own (`secret "ab-secret.acme.openai" not found`, `couldn't find key token in Secret
/// ns/ab-secret.acme.openai`).
fn container_config_message(kubelet: Option<&str>) -> String {
    let detail = kubelet.map(str::trim).filter(|m| !m.is_empty());
    let hint = if detail.is_some_and(|m| m.contains("ab-secret.")) {
        " (a secret the task references was deleted, or rewritten without the key, after the task was submitted)"
    } else {
        ""
    };
    match detail {
        Some(detail) => format!("the task's container cannot be configured: {detail}{hint}"),
        None => "the task's container cannot be configured (CreateContainerConfigError)".to_owned(),
    }
}

/// Decides for `task`, given its current attempt's Job (if it exists) and that Job's pods.
/// An ending names the node the pod ran on, and a timeout of a pod that was never
/// scheduled is classed `unschedulable`.
#[must_use]
pub fn decide(
    task: &TaskSummary,
    job: Option<&Job>,
    pods: &[&Pod],
    now: jiff::Timestamp,
    unschedulable_after: Duration,
    fallback: Option<&Fallback>,
) -> Decision {
    let decision = decide_from_status(task, job, pods, now, unschedulable_after, fallback);
    let class = match &decision {
        Decision::Move(Move::Ended(ending))
            if ending.state == TaskState::TimedOut && never_scheduled(pods) =>
        {
            Some(FailureClass::Unschedulable)
        }
        _ => None,
    };
    with_failure(decision, class, node_of(pods))
}

fn decide_from_status(
    task: &TaskSummary,
    job: Option<&Job>,
    pods: &[&Pod],
    now: jiff::Timestamp,
    unschedulable_after: Duration,
    fallback: Option<&Fallback>,
) -> Decision {
    let Some(job) = job else {
        return Decision::Nothing;
    };
    if task.state.is_terminal() {
        return if job_is_finished(job) || job.metadata.deletion_timestamp.is_some() {
            Decision::Nothing
        } else {
            Decision::DeleteJob
        };
    }

    if job_condition(job, "Complete").is_some() {
        return ended(
            TaskState::Succeeded,
            None,
            None,
            terminated(pods).map_or(Some(0), |t| Some(t.exit_code)),
        );
    }
    if let Some(failed) = job_condition(job, "Failed") {
        let message = failed.message.clone();
        return match failed.reason.as_deref() {
            Some("DeadlineExceeded") => ended(
                TaskState::TimedOut,
                Some(Reason::DeadlineExceeded),
                Some(format!(
                    "ran longer than its timeout of {}s",
                    task.timeout_seconds
                )),
                None,
            ),
            _ => failure_from_pods(pods, message),
        };
    }

    for pod in pods {
        let Some(status) = pod.status.as_ref() else {
            continue;
        };
        let waiting = status
            .container_statuses
            .iter()
            .flatten()
            .filter(|s| s.name == TASK_CONTAINER)
            .find_map(|s| s.state.as_ref()?.waiting.clone());
        let Some(waiting) = waiting else {
            continue;
        };
        let reason = waiting.reason.unwrap_or_default();
        if IMAGE_PULL_FAILURES.contains(&reason.as_str()) {
            return ended(
                TaskState::Failed,
                Some(Reason::ImagePull),
                Some(format!("image {}: {reason}", task.image)),
                None,
            );
        }
        if reason == CONTAINER_CONFIG_ERROR {
            return ended(
                TaskState::Failed,
                Some(Reason::LaunchRejected),
                Some(container_config_message(waiting.message.as_deref())),
                None,
            );
        }
    }

    let running = pods
        .iter()
        .any(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
    if running && task.state.can_move_to(TaskState::Running) {
        return Decision::Move(Move::Started);
    }
    if task.state == TaskState::Launching {
        // The Job exists: the launcher died after creating it, or has not recorded it yet.
        return Decision::Move(Move::Launched);
    }

    let unschedulable = pods.iter().find_map(|pod| {
        let conditions = pod.status.as_ref()?.conditions.as_ref()?;
        conditions
            .iter()
            .find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
            .map(|c| {
                (
                    c.last_transition_time.as_ref().map(|t| t.0),
                    c.message.clone().unwrap_or_default(),
                )
            })
    });
    if let Some((since, message)) = unschedulable {
        let waited = since
            .map(|since| now.duration_since(since))
            .unwrap_or_default();
        if let Some(fallback) = fallback
            && task.state == TaskState::Launched
            && another_class_could_help(&message)
            && waited >= jiff::SignedDuration::try_from(fallback.after).unwrap_or_default()
        {
            let current = task.gpu_class.as_deref().unwrap_or("its class");
            return Decision::FallBack {
                class: fallback.class.clone(),
                message: format!(
                    "no {current} node took the pod for {}s ({message}); trying {} as attempt {}",
                    fallback.after.as_secs(),
                    fallback.class,
                    task.attempt + 1
                ),
            };
        }
        let threshold = jiff::SignedDuration::try_from(unschedulable_after).unwrap_or_default();
        if waited >= threshold && task.reason != Some(Reason::Unschedulable) {
            return Decision::Note {
                reason: Reason::Unschedulable,
                message,
            };
        }
    }
    Decision::Nothing
}

/// The Job controller's reason on the events of a Job whose pod it could not create.
pub const FAILED_CREATE: &str = "FailedCreate";

/// Messages of pod refusals that no waiting fixes: a LimitRange the pod exceeds, or a
/// Pod Security profile it violates. (Kubernetes' own wording: `maximum cpu usage per
/// Container is 1, but limit is 2`, `cpu max limit to request ratio per Pod is …`,
/// `violates PodSecurity "restricted:latest"`.)
const REFUSED_FOR_GOOD: [&str; 4] = [
    "usage per Container is",
    "usage per Pod is",
    "limit to request ratio per",
    "violates PodSecurity",
];

/// Messages of a quota with no room now: full, or not yet counted by the quota controller
/// (the same words the launcher reads in a refused create).
const QUOTA_IS_FULL: [&str; 2] = ["exceeded quota", "status unknown for quota"];

/// When an event was last seen (the series, the last timestamp, the event time, or its
/// creation, whichever it has).
fn event_seen_at(event: &Event) -> Option<jiff::Timestamp> {
    event
        .series
        .as_ref()
        .and_then(|series| series.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// Kubernetes' refusal without the pod's generated name: from `exceeded quota` on when
/// it is a quota, else after the `is forbidden: ` of `Error creating: pods "x" is
/// forbidden: …`, so one refusal reads the same on every retry of the Job controller.
fn refusal_text(message: &str) -> &str {
    if let Some(at) = QUOTA_IS_FULL.iter().find_map(|phrase| message.find(phrase)) {
        return &message[at..];
    }
    message
        .split_once("is forbidden: ")
        .map_or(message, |(_, why)| why)
        .trim()
}

/// Decides for a `launched` task whose Job exists, runs no pod, and may have
/// `FailedCreate` events (`events`: those of the namespace; the Job's are picked by uid):
/// the namespace's ResourceQuota has no room for the pod (reason `cluster_quota`, the
/// task waits: the Job controller creates the pod once there is room), or a LimitRange
/// or Pod Security profile refuses it (the task fails, `launch_rejected`: it never will
/// fit). Any other refusal, or none, decides nothing.
#[must_use]
pub fn refused_pods(task: &TaskSummary, job: &Job, pods: &[&Pod], events: &[&Event]) -> Decision {
    if task.state != TaskState::Launched
        || !pods.is_empty()
        || job_is_finished(job)
        || job.metadata.deletion_timestamp.is_some()
    {
        return Decision::Nothing;
    }
    let uid = job.metadata.uid.as_deref();
    let name = job.metadata.name.as_deref();
    let latest = events
        .iter()
        .filter(|event| event.reason.as_deref() == Some(FAILED_CREATE))
        .filter(|event| {
            let about = &event.involved_object;
            about.kind.as_deref() == Some("Job")
                && match (uid, about.uid.as_deref()) {
                    (Some(job), Some(event)) => job == event,
                    _ => name.is_some() && about.name.as_deref() == name,
                }
        })
        .max_by_key(|event| event_seen_at(event));
    let Some(message) = latest.and_then(|event| event.message.as_deref()) else {
        return Decision::Nothing;
    };
    let why = refusal_text(message);
    if QUOTA_IS_FULL.iter().any(|phrase| why.contains(phrase)) {
        let message = format!("waiting for room in the namespace's ResourceQuota: {why}");
        if task.reason == Some(Reason::ClusterQuota) && task.message.as_deref() == Some(&message) {
            return Decision::Nothing;
        }
        return Decision::Note {
            reason: Reason::ClusterQuota,
            message,
        };
    }
    if REFUSED_FOR_GOOD.iter().any(|phrase| why.contains(phrase)) {
        return ended(
            TaskState::Failed,
            Some(Reason::LaunchRejected),
            Some(format!("kubernetes refuses the task's pod: {why}")),
            None,
        );
    }
    Decision::Nothing
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::{Decision, decide};
    use crate::task::fixtures::TaskFixture;
    use crate::task::lifecycle::Move;
    use crate::task::{Reason, TaskState};

    fn job(conditions: &serde_json::Value) -> Job {
        serde_json::from_value(
            json!({"metadata": {"name": "j"}, "status": {"conditions": conditions}}),
        )
        .unwrap()
    }

    fn pod(status: &serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status})).unwrap()
    }

    fn now() -> jiff::Timestamp {
        "2026-11-29T12:00:00Z".parse().unwrap()
    }

    fn decided(state: TaskState, job: Option<&Job>, pods: &[&Pod]) -> Decision {
        let mut task = TaskFixture::new().obj();
        task.state = state;
        decide(
            &crate::task::TaskSummary::from(&task),
            job,
            pods,
            now(),
            Duration::from_mins(1),
            None,
        )
    }

    fn moved_to(decision: &Decision) -> (TaskState, Option<Reason>, Option<i32>) {
        match decision {
            Decision::Move(Move::Ended(ending)) => (ending.state, ending.reason, ending.exit_code),
            Decision::Move(other) => (other.target(), None, None),
            other => panic!("expected a move, got {other:?}"),
        }
    }

    #[test]
    fn table() {
        use TaskState::{Failed, Launched, Launching, Running, Succeeded, TimedOut};
        type Case<'a> = (
            TaskState,
            Option<&'a Job>,
            Vec<&'a Pod>,
            (TaskState, Option<Reason>, Option<i32>),
        );
        let complete = job(&json!([{"type": "Complete", "status": "True"}]));
        let deadline =
            job(&json!([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]));
        let backoff = job(
            &json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]),
        );
        let active = job(&json!([]));
        let exit3 = pod(
            &json!({"phase": "Failed", "containerStatuses": [{"name": "task", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]}),
        );
        let oom = pod(
            &json!({"phase": "Failed", "containerStatuses": [{"name": "task", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
        );
        let running = pod(&json!({"phase": "Running"}));
        let pull = pod(
            &json!({"phase": "Pending", "containerStatuses": [{"name": "task", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}),
        );

        let cases: Vec<Case<'_>> = vec![
            (Running, Some(&complete), vec![], (Succeeded, None, Some(0))),
            (
                Launched,
                Some(&complete),
                vec![],
                (Succeeded, None, Some(0)),
            ),
            (
                Running,
                Some(&deadline),
                vec![],
                (TimedOut, Some(Reason::DeadlineExceeded), None),
            ),
            (
                Running,
                Some(&backoff),
                vec![&exit3],
                (Failed, Some(Reason::ExitCode), Some(3)),
            ),
            (
                Running,
                Some(&backoff),
                vec![&oom],
                (Failed, Some(Reason::OomKilled), Some(137)),
            ),
            (
                Running,
                Some(&backoff),
                vec![],
                (Failed, Some(Reason::BackoffLimit), None),
            ),
            (
                Launched,
                Some(&active),
                vec![&running],
                (Running, None, None),
            ),
            (Launching, Some(&active), vec![], (Launched, None, None)),
            (
                Launched,
                Some(&active),
                vec![&pull],
                (Failed, Some(Reason::ImagePull), None),
            ),
        ];
        for (state, job, pods, expected) in cases {
            assert_eq!(
                moved_to(&decided(state, job, &pods)),
                expected,
                "from {state} with {job:?}"
            );
        }
    }

    #[test]
    fn a_container_whose_secret_is_gone_fails_the_attempt_naming_it() {
        let active = job(&json!([]));
        let waiting = |message: Option<&str>| {
            let mut waiting = json!({"reason": "CreateContainerConfigError"});
            if let Some(message) = message {
                waiting["message"] = json!(message);
            }
            pod(
                &json!({"phase": "Pending", "containerStatuses": [{"name": "task", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": waiting}}]}),
            )
        };
        let hint = " (a secret the task references was deleted, or rewritten without the key, after the task was submitted)";
        for (kubelet, expected) in [
            (
                Some(r#"secret "ab-secret.acme.openai" not found"#),
                format!(
                    r#"the task's container cannot be configured: secret "ab-secret.acme.openai" not found{hint}"#
                ),
            ),
            (
                Some("couldn't find key token in Secret agent-bus-tasks/ab-secret.acme.openai"),
                format!(
                    "the task's container cannot be configured: couldn't find key token in Secret agent-bus-tasks/ab-secret.acme.openai{hint}"
                ),
            ),
            (
                Some(r#"configmap "x" not found"#),
                r#"the task's container cannot be configured: configmap "x" not found"#.to_owned(),
            ),
            (
                None,
                "the task's container cannot be configured (CreateContainerConfigError)".to_owned(),
            ),
        ] {
            let pod = waiting(kubelet);
            for state in [TaskState::Launched, TaskState::Launching] {
                let decision = decided(state, Some(&active), &[&pod]);
                let Decision::Move(Move::Ended(ending)) = decision else {
                    panic!("expected an ending, got {decision:?}");
                };
                assert_eq!(ending.state, TaskState::Failed);
                assert_eq!(ending.reason, Some(Reason::LaunchRejected));
                // The failure class of launch_rejected, which the default policy never retries.
                assert_eq!(
                    crate::task::retry::FailureClass::of_reason(ending.reason),
                    crate::task::retry::FailureClass::LaunchRejected
                );
                assert_eq!(
                    ending.message.as_deref(),
                    Some(expected.as_str()),
                    "{kubelet:?}"
                );
            }
        }
    }

    #[test]
    fn nothing_without_a_job_or_news() {
        assert_eq!(decided(TaskState::Launched, None, &[]), Decision::Nothing);
        let active = job(&json!([]));
        let running = pod(&json!({"phase": "Running"}));
        assert_eq!(
            decided(TaskState::Running, Some(&active), &[&running]),
            Decision::Nothing
        );
    }

    #[test]
    fn a_cancelled_task_with_a_live_job_gets_its_job_deleted() {
        let active = job(&json!([]));
        assert_eq!(
            decided(TaskState::Cancelled, Some(&active), &[]),
            Decision::DeleteJob
        );
        let complete = job(&json!([{"type": "Complete", "status": "True"}]));
        assert_eq!(
            decided(TaskState::Cancelled, Some(&complete), &[]),
            Decision::Nothing
        );
    }

    #[test]
    fn unschedulable_is_noted_only_after_the_threshold() {
        let active = job(&json!([]));
        let since = |seconds_ago: i64| {
            let at = now() - jiff::SignedDuration::from_secs(seconds_ago);
            pod(
                &json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/9 nodes are available", "lastTransitionTime": at.to_string()}]}),
            )
        };
        let recent = since(10);
        assert_eq!(
            decided(TaskState::Launched, Some(&active), &[&recent]),
            Decision::Nothing
        );
        let old = since(120);
        assert!(matches!(
            decided(TaskState::Launched, Some(&active), &[&old]),
            Decision::Note {
                reason: Reason::Unschedulable,
                ..
            }
        ));
    }

    #[test]
    fn the_runner_summary_names_the_real_failure() {
        let backoff =
            job(&json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]));
        let summary = |class: &str| {
            let message = json!({"v": 1, "exit_code": 1, "failure_class": class,
                "stderr_tail": "torch.OutOfMemoryError: CUDA out of memory"})
            .to_string();
            pod(
                &json!({"phase": "Failed", "containerStatuses": [{"name": "task", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}}}]}),
            )
        };
        let cuda = summary("cuda_oom");
        let decision = decided(TaskState::Running, Some(&backoff), &[&cuda]);
        assert_eq!(
            moved_to(&decision),
            (TaskState::Failed, Some(Reason::GpuOutOfMemory), Some(1))
        );
        let Decision::Move(Move::Ended(ending)) = decision else {
            unreachable!()
        };
        assert!(
            ending
                .message
                .unwrap()
                .contains("(cuda_oom): torch.OutOfMemoryError")
        );
        let timeout = summary("timeout");
        assert_eq!(
            moved_to(&decided(TaskState::Running, Some(&backoff), &[&timeout])).0,
            TaskState::TimedOut
        );
        assert!(super::termination_summary(&[&timeout]).is_some());
    }

    #[test]
    fn an_unschedulable_pod_falls_back_after_its_threshold() {
        let active = job(&json!([]));
        let at = now() - jiff::SignedDuration::from_secs(45);
        let pending = pod(
            &json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/9 nodes are available: 1 Insufficient nvidia.com/gpu",
            "lastTransitionTime": at.to_string()}]}),
        );
        let mut task = TaskFixture::new().gpus(8, "h100").obj();
        task.state = TaskState::Launched;
        let fallback = super::Fallback {
            class: "a100".into(),
            after: Duration::from_secs(30),
        };
        let decision = decide(
            &crate::task::TaskSummary::from(&task),
            Some(&active),
            &[&pending],
            now(),
            Duration::from_mins(1),
            Some(&fallback),
        );
        match decision {
            Decision::FallBack { class, message } => {
                assert_eq!(class, "a100");
                assert!(
                    message.contains("no h100 node took the pod for 30s"),
                    "{message}"
                );
                assert!(message.contains("attempt 2"), "{message}");
            }
            other => panic!("expected a fallback, got {other:?}"),
        }
        let later = super::Fallback {
            class: "a100".into(),
            after: Duration::from_mins(5),
        };
        assert_eq!(
            decide(
                &crate::task::TaskSummary::from(&task),
                Some(&active),
                &[&pending],
                now(),
                Duration::from_mins(1),
                Some(&later)
            ),
            Decision::Nothing
        );
    }

    fn event(
        uid: &str,
        reason: &str,
        message: &str,
        seconds_ago: i64,
    ) -> k8s_openapi::api::core::v1::Event {
        let at = now() - jiff::SignedDuration::from_secs(seconds_ago);
        serde_json::from_value(json!({"metadata": {"name": format!("e{seconds_ago}")},
            "involvedObject": {"kind": "Job", "name": "j", "uid": uid},
            "reason": reason, "message": message, "lastTimestamp": at.to_string()}))
        .unwrap()
    }

    /// What [`super::refused_pods`] should decide, in the table below.
    enum Expect {
        Nothing,
        Note(&'static str),
        Fails(&'static str),
    }

    /// (task state, Job, pods, events, expected).
    type RefusalCase<'a> = (
        TaskState,
        &'a Job,
        Vec<&'a Pod>,
        Vec<&'a k8s_openapi::api::core::v1::Event>,
        Expect,
    );

    #[test]
    fn refused_pods_wait_for_quota_and_fail_on_a_limit_range() {
        use super::refused_pods;
        let active: Job = serde_json::from_value(
            json!({"metadata": {"name": "j", "uid": "u1"}, "status": {"conditions": []}}),
        )
        .unwrap();
        let complete: Job = serde_json::from_value(json!({"metadata": {"name": "j", "uid": "u1"},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]}}))
        .unwrap();
        let quota = event(
            "u1",
            "FailedCreate",
            "Error creating: pods \"j-x7k2p\" is forbidden: exceeded quota: tasks, requested: pods=1, used: pods=2, limited: pods=2",
            5,
        );
        let older_quota = event(
            "u1",
            "FailedCreate",
            "Error creating: pods \"j-abcde\" is forbidden: exceeded quota: tasks, requested: pods=1, used: pods=1, limited: pods=1",
            50,
        );
        let limit_range = event(
            "u1",
            "FailedCreate",
            "Error creating: pods \"j-x7k2p\" is forbidden: maximum cpu usage per Container is 1, but limit is 2",
            5,
        );
        let pod_security = event(
            "u1",
            "FailedCreate",
            "Error creating: pods \"j-x7k2p\" is forbidden: violates PodSecurity \"restricted:latest\": privileged",
            5,
        );
        let other_job = event(
            "u2",
            "FailedCreate",
            "Error creating: pods \"k-1\" is forbidden: exceeded quota: tasks",
            1,
        );
        let created = event("u1", "SuccessfulCreate", "Created pod: j-x7k2p", 1);
        let webhook = event(
            "u1",
            "FailedCreate",
            "Error creating: Internal error occurred: failed calling webhook",
            1,
        );
        let running = pod(&json!({"phase": "Running"}));
        let quota_note = "waiting for room in the namespace's ResourceQuota: exceeded quota: tasks, requested: pods=1, used: pods=2, limited: pods=2";

        let cases: Vec<RefusalCase<'_>> = vec![
            // The latest refusal of this Job is what the task shows, without the pod's name.
            (
                TaskState::Launched,
                &active,
                vec![],
                vec![&older_quota, &quota, &other_job, &created],
                Expect::Note(quota_note),
            ),
            (
                TaskState::Launched,
                &active,
                vec![],
                vec![&limit_range],
                Expect::Fails(
                    "kubernetes refuses the task's pod: maximum cpu usage per Container is 1, but limit is 2",
                ),
            ),
            (
                TaskState::Launched,
                &active,
                vec![],
                vec![&pod_security],
                Expect::Fails(
                    "kubernetes refuses the task's pod: violates PodSecurity \"restricted:latest\": privileged",
                ),
            ),
            // Nothing to say: another Job's refusal, no refusal, one we cannot classify.
            (
                TaskState::Launched,
                &active,
                vec![],
                vec![&other_job, &created],
                Expect::Nothing,
            ),
            (
                TaskState::Launched,
                &active,
                vec![],
                vec![],
                Expect::Nothing,
            ),
            (
                TaskState::Launched,
                &active,
                vec![],
                vec![&webhook],
                Expect::Nothing,
            ),
            // A pod exists (room came), the Job finished, or the task is not waiting on its pod.
            (
                TaskState::Launched,
                &active,
                vec![&running],
                vec![&quota],
                Expect::Nothing,
            ),
            (
                TaskState::Launched,
                &complete,
                vec![],
                vec![&quota],
                Expect::Nothing,
            ),
            (
                TaskState::Running,
                &active,
                vec![],
                vec![&quota],
                Expect::Nothing,
            ),
            (
                TaskState::Launching,
                &active,
                vec![],
                vec![&quota],
                Expect::Nothing,
            ),
        ];
        for (row, (state, job, pods, events, expected)) in cases.into_iter().enumerate() {
            let mut task = TaskFixture::new().obj();
            task.state = state;
            let decision =
                refused_pods(&crate::task::TaskSummary::from(&task), job, &pods, &events);
            match (expected, decision) {
                (Expect::Nothing, Decision::Nothing) => {}
                (
                    Expect::Note(message),
                    Decision::Note {
                        reason,
                        message: noted,
                    },
                ) => {
                    assert_eq!(
                        (reason, noted.as_str()),
                        (Reason::ClusterQuota, message),
                        "row {row}"
                    );
                }
                (Expect::Fails(message), Decision::Move(Move::Ended(ending))) => {
                    assert_eq!(
                        (ending.state, ending.reason, ending.message.as_deref()),
                        (
                            TaskState::Failed,
                            Some(Reason::LaunchRejected),
                            Some(message)
                        ),
                        "row {row}"
                    );
                }
                (_, other) => panic!("row {row}: unexpected {other:?}"),
            }
        }

        // Already noted with the same words: nothing to write again.
        let mut noted = TaskFixture::new().obj();
        noted.state = TaskState::Launched;
        noted.reason = Some(Reason::ClusterQuota);
        noted.message = Some(quota_note.to_owned());
        assert_eq!(
            refused_pods(
                &crate::task::TaskSummary::from(&noted),
                &active,
                &[],
                &[&quota]
            ),
            Decision::Nothing
        );
    }
}
