//! Retries in the store, through the lifecycle: a retry waits out its backoff (no claim
//! before it ends, one release after), every attempt leaves a row, the cost covers every
//! attempt, and a spent budget ends the task instead of a retry.

use dispatcher::cost::{Budget, BudgetAction, Prices};
use dispatcher::lifecycle::Lifecycle;
use dispatcher::metrics::Metrics;
use dispatcher::store::{ReportAllowance, Store};
use dispatcher::task::lifecycle::{Ending, Move};
use dispatcher::task::retry::{RetryAction, RetryPolicy};
use dispatcher::task::{AttemptOutcome, Reason, Task, TaskState};
use protocol::{Progress, Report, ReportBody, TerminationSummary, Usage};

use super::support::*;

both_backends!(
    case_a_retry_waits_out_its_backoff_and_is_released_once,
    case_a_spent_budget_ends_the_task_instead_of_a_retry,
    case_a_replacement_pod_of_the_same_attempt_is_kept_apart,
);

fn lifecycle(store: &Store) -> Lifecycle {
    Lifecycle::new(store.clone(), Metrics::new("test"), Prices::default())
}

fn backoff(seconds: u32) -> RetryPolicy {
    RetryPolicy {
        backoff_seconds: Some(seconds),
        ..RetryPolicy::default()
    }
}

/// Claims, launches and starts queued `task`.
async fn run(lifecycle: &Lifecycle, task: &Task) -> Task {
    let mut current = task.clone();
    for step in [Move::Claim, Move::Launched, Move::Started] {
        current = lifecycle
            .apply(current.id, current.state, step)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} did not move", current.state));
    }
    assert_eq!(current.state, TaskState::Running);
    current
}

fn exited(code: i32) -> Move {
    Move::Ended(
        Ending::new(TaskState::Failed)
            .reason(Reason::ExitCode)
            .exit_code(code),
    )
}

async fn case_a_retry_waits_out_its_backoff_and_is_released_once(store: Store) {
    acme(&store).await;
    let lifecycle = lifecycle(&store);
    let task = task("acme")
        .with(|t| t.retries(1, Some(backoff(3600))))
        .create(&store)
        .await;
    let running = run(&lifecycle, &task).await;
    let retried = lifecycle
        .apply(running.id, TaskState::Running, exited(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retried.state, TaskState::Queued);
    assert_eq!(retried.reason, Some(Reason::Retrying));
    assert_eq!(retried.attempt, 2);
    assert_eq!(retried.retries.counted, 1);
    let not_before = retried.next_attempt_at.expect("a backoff");
    assert!(not_before > jiff::Timestamp::now() + jiff::SignedDuration::from_mins(29));
    assert_eq!(
        retried.timeline.started_at, None,
        "a new attempt's timeline"
    );

    // Still backing off: no launcher may claim it, and nothing is due.
    assert_eq!(lifecycle.claim(retried.id).await.unwrap().claimed(), None);
    assert!(
        lifecycle
            .release_due_retries(jiff::Timestamp::now())
            .await
            .unwrap()
            .is_empty()
    );
    // Once due it is released once, whoever asks.
    let due = not_before + jiff::SignedDuration::from_secs(1);
    let released = lifecycle.release_due_retries(due).await.unwrap();
    assert_eq!(
        released.iter().map(|t| t.id).collect::<Vec<_>>(),
        [retried.id]
    );
    assert_eq!(released[0].next_attempt_at, None);
    assert!(lifecycle.release_due_retries(due).await.unwrap().is_empty());
    let claimed = lifecycle
        .claim(retried.id)
        .await
        .unwrap()
        .claimed()
        .expect("claimable once released");
    assert_eq!(claimed.attempt, 2);

    // The first attempt's row: failed, retried, with the rule and backoff said.
    let attempts = store.attempts(task.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].attempt, 1);
    assert_eq!(attempts[0].outcome, AttemptOutcome::Failed);
    assert_eq!(attempts[0].exit_code, Some(1));
    assert_eq!(attempts[0].action, Some(RetryAction::Retry));
    assert!(attempts[0].started_at.is_some());
    let decision = attempts[0].decision.as_deref().unwrap();
    assert!(decision.starts_with("retry 1 of 1 after "), "{decision}");

    // The second attempt succeeds: its row joins the first, the task's cost covers both.
    let running = lifecycle
        .apply(claimed.id, TaskState::Launching, Move::Started)
        .await
        .unwrap()
        .unwrap();
    let done = lifecycle
        .apply(
            running.id,
            TaskState::Running,
            Move::Ended(Ending::new(TaskState::Succeeded).exit_code(0)),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    let attempts = store.attempts(task.id).await.unwrap();
    let outcomes: Vec<_> = attempts.iter().map(|a| (a.attempt, a.outcome)).collect();
    assert_eq!(
        outcomes,
        [(1, AttemptOutcome::Failed), (2, AttemptOutcome::Succeeded)]
    );
    let compute = done.spent.compute.expect("settled");
    let attempts_total: f64 = attempts.iter().map(|a| a.cost.total()).sum();
    assert!(
        (compute.total() - attempts_total).abs() < 1e-9,
        "{compute:?} {attempts:?}"
    );
}

async fn case_a_spent_budget_ends_the_task_instead_of_a_retry(store: Store) {
    acme(&store).await;
    store
        .set_budget(
            "acme",
            &Budget {
                daily_dollars: Some(1.0),
                monthly_dollars: None,
                action: BudgetAction::Refuse,
            },
        )
        .await
        .unwrap();
    let lifecycle = lifecycle(&store);
    let task = task("acme")
        .with(|t| t.retries(3, Some(backoff(0))))
        .create(&store)
        .await;
    let running = run(&lifecycle, &task).await;
    // The task's own LLM calls spent the day's budget.
    let usage = Report {
        sequence: 1,
        sent_at: jiff::Timestamp::now().to_string(),
        body: ReportBody::Usage(Usage {
            model: "gpt-4o".to_owned(),
            calls: 1,
            input_tokens: 10,
            output_tokens: 10,
            cost_usd: 2.0,
        }),
    };
    store
        .record_reports(running.id, 1, &[usage], &ReportAllowance::default())
        .await
        .unwrap()
        .recorded()
        .unwrap();
    let ended = lifecycle
        .apply(running.id, TaskState::Running, exited(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, TaskState::Failed);
    assert_eq!(ended.reason, Some(Reason::BudgetExhausted));
    assert_eq!(ended.attempt, 1);
    assert_eq!(ended.exit_code, Some(1));
    let message = ended.message.unwrap();
    assert!(
        message.starts_with("attempt 1 failed (exit_code); not retried: tenant 'acme' has spent $2.00 of its daily budget of $1.00"),
        "{message}"
    );
    let attempts = store.attempts(task.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].action, Some(RetryAction::Fail));
}

fn usage(sequence: u64, dollars: f64) -> Report {
    Report {
        sequence,
        sent_at: jiff::Timestamp::now().to_string(),
        body: ReportBody::Usage(Usage {
            model: "gpt-4o".to_owned(),
            calls: 1,
            input_tokens: 100,
            output_tokens: 10,
            cost_usd: dollars,
        }),
    }
}

fn progress(sequence: u64, percent: f64) -> Report {
    Report {
        sequence,
        sent_at: jiff::Timestamp::now().to_string(),
        body: ReportBody::Progress(Progress {
            percent,
            message: None,
        }),
    }
}

async fn case_a_replacement_pod_of_the_same_attempt_is_kept_apart(store: Store) {
    acme(&store).await;
    let lifecycle = lifecycle(&store);
    let task = task("acme").create(&store).await;
    let running = run(&lifecycle, &task).await;
    // The first pod (started at ms 1_000) reports, then is evicted; the Job's replacement
    // pod (started at ms 9_000) numbers its reports from its own start.
    let first = protocol::first_sequence(1_000);
    let second = protocol::first_sequence(9_000);
    let recorded = store
        .record_reports(
            running.id,
            1,
            &[progress(first, 40.0), usage(first + 1, 1.0)],
            &ReportAllowance::default(),
        )
        .await
        .unwrap()
        .recorded()
        .unwrap();
    assert_eq!(recorded.accepted, 2);
    let recorded = store
        .record_reports(
            running.id,
            1,
            &[progress(second, 10.0), usage(second + 1, 0.5)],
            &ReportAllowance::default(),
        )
        .await
        .unwrap()
        .recorded()
        .unwrap();
    assert_eq!(
        (recorded.accepted, recorded.duplicates),
        (2, 0),
        "kept, not duplicates"
    );
    let after = store.task(task.id).await.unwrap().unwrap();
    assert!(
        (after.spent.llm_dollars - 1.5).abs() < 1e-9,
        "{:?}",
        after.spent
    );
    let sequences: Vec<u64> = store
        .reports(task.id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.sequence)
        .collect();
    assert_eq!(sequences, [first, first + 1, second, second + 1]);

    // The replacement's summary counts $0.70, of which its own reports brought $0.50:
    // $0.20 never arrived as a report; the first pod's $1.00 is not set against it.
    let summary = TerminationSummary {
        v: 1,
        usage: vec![Usage {
            model: "gpt-4o".to_owned(),
            calls: 2,
            input_tokens: 200,
            output_tokens: 20,
            cost_usd: 0.7,
        }],
        first_sequence: second,
        ..TerminationSummary::default()
    };
    lifecycle
        .record_termination(task.id, 1, &summary)
        .await
        .unwrap();
    let after = store.task(task.id).await.unwrap().unwrap();
    assert!(
        (after.spent.llm_dollars - 1.7).abs() < 1e-9,
        "{:?}",
        after.spent
    );
}
