use super::{Ending, Move, MoveKind, NextAttempt, Stamp, Stamps, Why, plan_note};
use crate::task::retry::RetryCount;
use crate::task::{Breakdown, Reason, TaskState};

fn at() -> jiff::Timestamp {
    "2026-12-01T12:00:00Z".parse().unwrap()
}

/// One move of each kind, with the data it needs.
fn example(kind: MoveKind) -> Move {
    match kind {
        MoveKind::Claim => Move::Claim,
        MoveKind::Launched => Move::Launched,
        MoveKind::Started => Move::Started,
        MoveKind::Ended => Move::Ended(
            Ending::new(TaskState::Failed)
                .reason(Reason::ExitCode)
                .exit_code(3),
        ),
        MoveKind::LaunchRejected => Move::LaunchRejected {
            message: "forbidden".to_owned(),
        },
        MoveKind::Cancel => Move::Cancel,
        MoveKind::FallBack => Move::FallBack {
            class: "a100".to_owned(),
            attempt: 2,
            message: "no v100 node".to_owned(),
        },
        MoveKind::Lost => Move::Lost {
            message: "gone".to_owned(),
        },
        MoveKind::HeartbeatLost => Move::HeartbeatLost {
            message: "silent".to_owned(),
        },
        MoveKind::Expire => Move::Expire {
            message: "waited 60s".to_owned(),
        },
        MoveKind::Retry => Move::Retry {
            next: Box::new(NextAttempt {
                attempt: 2,
                retries: RetryCount {
                    counted: 1,
                    ignored: 0,
                },
                not_before: at(),
                expires_at: None,
                spec: None,
                gpu_class: None,
                avoid_nodes: None,
                earlier_attempts: Breakdown::default(),
            }),
            message: "attempt 1 failed".to_owned(),
        },
    }
}

#[test]
fn every_move_from_every_state_is_planned_exactly_by_the_table() {
    for kind in MoveKind::ALL {
        for from in TaskState::ALL {
            let planned = example(kind).plan(from, at());
            let listed = kind.sources().contains(&from);
            assert_eq!(planned.is_ok(), listed, "{kind} from {from}: {planned:?}");
            if let Ok(planned) = planned {
                assert!(
                    from.can_move_to(planned.to),
                    "{kind}: {from} -> {} is no edge of the state graph",
                    planned.to
                );
                assert_eq!(planned.stamps, Stamps::entering(planned.to));
                if let Some(reason) = planned.reason {
                    assert!(
                        reason.fits(planned.to),
                        "{kind}: {reason} on {}",
                        planned.to
                    );
                }
            } else {
                assert_eq!(planned.unwrap_err().why, Why::NotFromThisState);
            }
        }
    }
}

#[test]
fn terminal_tasks_never_move_and_take_no_note() {
    for kind in MoveKind::ALL {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert!(
                example(kind).plan(from, at()).is_err(),
                "{kind} from {from}"
            );
            assert_eq!(
                plan_note(from, Reason::Unschedulable, "x", at())
                    .unwrap_err()
                    .why,
                Why::NoteOnTerminal
            );
        }
    }
}

#[test]
fn the_table_of_moves() {
    use TaskState::{
        Cancelled, Expired, Failed, Launched, Launching, Queued, Running, Succeeded, TimedOut,
    };
    let table: [(MoveKind, &[TaskState], &[TaskState]); 10] = [
        (MoveKind::Claim, &[Queued], &[Launching]),
        (MoveKind::Launched, &[Launching], &[Launched]),
        (MoveKind::Started, &[Launching, Launched], &[Running]),
        (
            MoveKind::Ended,
            &[Launching, Launched, Running],
            &[Succeeded, Failed, TimedOut],
        ),
        (MoveKind::LaunchRejected, &[Launching], &[Failed]),
        (
            MoveKind::Cancel,
            &[Queued, Launching, Launched, Running],
            &[Cancelled],
        ),
        (MoveKind::FallBack, &[Launching, Launched], &[Queued]),
        (MoveKind::Lost, &[Launching, Launched, Running], &[Failed]),
        (MoveKind::HeartbeatLost, &[Running], &[Failed]),
        (MoveKind::Expire, &[Queued, Launching], &[Expired]),
    ];
    for (kind, sources, targets) in table {
        assert_eq!(kind.sources(), sources, "{kind}");
        assert_eq!(kind.targets(), targets, "{kind}");
    }
}

#[test]
fn an_ending_must_be_an_outcome_with_a_fitting_reason() {
    for state in TaskState::ALL {
        let planned = Move::Ended(Ending::new(state)).plan(TaskState::Running, at());
        let outcome = matches!(
            state,
            TaskState::Succeeded | TaskState::Failed | TaskState::TimedOut
        );
        assert_eq!(planned.is_ok(), outcome, "ending in {state}");
    }
    let cancelled_as_failure =
        Move::Ended(Ending::new(TaskState::Failed).reason(Reason::CancelledByUser))
            .plan(TaskState::Running, at());
    assert_eq!(
        cancelled_as_failure.unwrap_err().why,
        Why::ReasonDoesNotFit(Reason::CancelledByUser)
    );
}

#[test]
fn reasons_fit_the_states_they_explain() {
    use TaskState::{
        Cancelled, Expired, Failed, Launched, Launching, Queued, Running, Succeeded, TimedOut,
    };
    for reason in Reason::ALL {
        let fitting: Vec<TaskState> = TaskState::ALL
            .into_iter()
            .filter(|state| reason.fits(*state))
            .collect();
        let expected: &[TaskState] = match reason {
            Reason::DeadlineExceeded => &[Failed, TimedOut],
            Reason::Unschedulable => &[Launching, Launched],
            Reason::HeartbeatLost => &[Running, Failed],
            Reason::CancelledByUser => &[Cancelled],
            Reason::FellBack | Reason::Retrying | Reason::TenantQuota => &[Queued],
            Reason::ClusterQuota => &[Queued, Launching, Launched],
            Reason::QueueTtl => &[Expired],
            _ => &[Failed],
        };
        assert_eq!(fitting, expected, "{reason}");
        assert!(!reason.fits(Succeeded), "{reason}");
    }
}

#[test]
fn timestamps_follow_one_rule() {
    use Stamp::{Clear, Keep, Now, NowIfUnset};
    for from in TaskState::ALL {
        for to in TaskState::ALL
            .into_iter()
            .filter(|to| from.can_move_to(*to))
        {
            let stamps = Stamps::entering(to);
            let expected = match to {
                TaskState::Queued => [Now, Clear, Clear, Keep],
                TaskState::Launching => [Keep, Keep, Keep, Keep],
                TaskState::Launched => [Keep, NowIfUnset, Keep, Keep],
                TaskState::Running => [Keep, NowIfUnset, NowIfUnset, Keep],
                _ => [Keep, Keep, Keep, Now],
            };
            assert_eq!(
                [
                    stamps.queued_at,
                    stamps.launched_at,
                    stamps.started_at,
                    stamps.finished_at
                ],
                expected,
                "{from} -> {to}"
            );
        }
    }
}

#[test]
fn a_fall_back_is_a_new_attempt_on_another_class() {
    let planned = example(MoveKind::FallBack)
        .plan(TaskState::Launched, at())
        .unwrap();
    assert_eq!(planned.to, TaskState::Queued);
    assert_eq!(planned.reason, Some(Reason::FellBack));
    assert_eq!(planned.attempt, Some(2));
    assert_eq!(planned.gpu_class.as_deref(), Some("a100"));
    assert!(!planned.claimable_only);
}

#[test]
fn only_a_claim_minds_the_queue_ttl_and_the_quota() {
    for kind in MoveKind::ALL {
        let from = kind.sources()[0];
        let step = example(kind).plan(from, at()).unwrap();
        assert_eq!(step.claimable_only, kind == MoveKind::Claim, "{kind}");
        assert_eq!(step.within_quota, kind == MoveKind::Claim, "{kind}");
    }
}

#[test]
fn notes_explain_a_wait() {
    assert!(plan_note(TaskState::Launched, Reason::Unschedulable, "no node", at()).is_ok());
    assert!(plan_note(TaskState::Running, Reason::HeartbeatLost, "silent", at()).is_ok());
    assert_eq!(
        plan_note(TaskState::Running, Reason::CancelledByUser, "x", at())
            .unwrap_err()
            .why,
        Why::ReasonDoesNotFit(Reason::CancelledByUser)
    );
}

#[test]
fn a_retry_is_a_new_attempt_waiting_in_the_queue() {
    let step = example(MoveKind::Retry)
        .plan(TaskState::Running, at())
        .unwrap();
    assert_eq!(step.to, TaskState::Queued);
    assert_eq!(step.reason, Some(Reason::Retrying));
    assert_eq!(step.attempt, Some(2));
    assert_eq!(step.stamps, Stamps::entering(TaskState::Queued));
    assert!(step.next_attempt.is_some());
    assert!(
        example(MoveKind::Retry)
            .plan(TaskState::Queued, at())
            .is_err()
    );
}

#[test]
fn only_moves_of_a_started_attempt_end_it() {
    for kind in MoveKind::ALL {
        let ends = matches!(
            kind,
            MoveKind::Ended
                | MoveKind::LaunchRejected
                | MoveKind::Cancel
                | MoveKind::FallBack
                | MoveKind::Lost
                | MoveKind::HeartbeatLost
                | MoveKind::Retry
        );
        assert_eq!(
            example(kind).ends_attempt(TaskState::Running),
            ends,
            "{kind}"
        );
        assert!(!example(kind).ends_attempt(TaskState::Queued), "{kind}");
    }
}

#[test]
fn failures_name_their_class() {
    use crate::task::retry::FailureClass;
    let class = |step: Move| step.failure().map(|f| f.class);
    assert_eq!(
        class(example(MoveKind::Ended)),
        Some(FailureClass::ExitCode)
    );
    assert_eq!(class(example(MoveKind::Lost)), Some(FailureClass::JobLost));
    assert_eq!(
        class(example(MoveKind::LaunchRejected)),
        Some(FailureClass::LaunchRejected)
    );
    assert_eq!(
        class(example(MoveKind::HeartbeatLost)),
        Some(FailureClass::HeartbeatLost)
    );
    let signalled = Ending::new(TaskState::Failed)
        .reason(Reason::ExitCode)
        .exit_code(137)
        .class(FailureClass::Signal)
        .node(Some("gpu-a100-0".to_owned()));
    let failure = Move::Ended(signalled).failure().unwrap();
    assert_eq!(failure.class, FailureClass::Signal);
    assert_eq!(failure.exit_code, Some(137));
    assert_eq!(failure.node.as_deref(), Some("gpu-a100-0"));
    assert_eq!(
        Move::Ended(Ending::new(TaskState::Succeeded)).failure(),
        None
    );
    assert_eq!(class(example(MoveKind::Cancel)), None);
    assert_eq!(class(example(MoveKind::FallBack)), None);
}
