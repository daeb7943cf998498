//! Transitions: compare-and-set with its event row, wrong-state and illegal moves, one
//! winner among concurrent claims, notes, and the event story in order.

use dispatcher::store::{Store, StoreError};
use dispatcher::task::lifecycle::{PlannedNote, Step};
use dispatcher::task::{Reason, TaskId, TaskState};
use futures::future::join_all;

use super::support::*;

both_backends!(
    case_a_stale_claim_is_taken_by_one_launcher,
    case_a_transition_writes_its_event,
    case_a_transition_from_the_wrong_state_writes_nothing,
    case_an_illegal_transition_is_refused,
    case_concurrent_claims_of_one_task_have_one_winner,
    case_a_note_records_why_a_task_waits,
    case_events_tell_the_story_in_order,
);

async fn case_a_transition_writes_its_event(store: Store) {
    acme(&store).await;
    let queued = task("acme").create(&store).await;

    let launching = store
        .transition(
            queued.id,
            &Step::new(TaskState::Queued, TaskState::Launching).message("claimed by launcher-0"),
            |_| None,
            &|_, _| String::new(),
        )
        .await
        .unwrap()
        .expect("the move applies");
    assert_eq!(launching.state, TaskState::Launching);
    assert_eq!(launching.message.as_deref(), Some("claimed by launcher-0"));
    assert_eq!(launching.spec, queued.spec);
    assert!(launching.updated_at >= queued.updated_at);
    assert_eq!(launching.created_at, queued.created_at);
    assert_eq!(
        store.task(queued.id).await.unwrap(),
        Some(launching.clone())
    );

    let events = store.events(queued.id, None).await.unwrap();
    assert_eq!(
        moves(&events),
        [
            (None, TaskState::Queued),
            (Some(TaskState::Queued), TaskState::Launching)
        ]
    );
    assert_eq!(events[1].message.as_deref(), Some("claimed by launcher-0"));
    assert_eq!(events[1].at, launching.updated_at);
    assert_eq!(events[1].task_id, queued.id);
}

async fn case_a_transition_from_the_wrong_state_writes_nothing(store: Store) {
    acme(&store).await;
    let queued = task("acme").create(&store).await;

    let applied = store
        .transition(
            queued.id,
            &Step::new(TaskState::Launching, TaskState::Launched),
            |_| None,
            &|_, _| String::new(),
        )
        .await
        .unwrap();
    assert_eq!(applied, None);
    assert_eq!(store.task(queued.id).await.unwrap(), Some(queued.clone()));
    assert_eq!(store.events(queued.id, None).await.unwrap().len(), 1);

    let missing = store
        .transition(
            TaskId::new(),
            &Step::new(TaskState::Queued, TaskState::Launching),
            |_| None,
            &|_, _| String::new(),
        )
        .await
        .unwrap();
    assert_eq!(missing, None);
}

async fn case_an_illegal_transition_is_refused(store: Store) {
    acme(&store).await;
    let queued = task("acme").create(&store).await;

    let error = store
        .transition(
            queued.id,
            &Step::new(TaskState::Queued, TaskState::Succeeded),
            |_| None,
            &|_, _| String::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::IllegalTransition { task_id, from: TaskState::Queued, to: TaskState::Succeeded }
                if task_id == queued.id
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!("task {} may not move from queued to succeeded", queued.id)
    );
    assert_eq!(store.task(queued.id).await.unwrap(), Some(queued.clone()));
    assert_eq!(store.events(queued.id, None).await.unwrap().len(), 1);

    let done = walk(&store, &queued, &[TaskState::Cancelled]).await;
    let error = store
        .transition(
            done.id,
            &Step::new(TaskState::Cancelled, TaskState::Queued),
            |_| None,
            &|_, _| String::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::IllegalTransition { .. }),
        "{error:?}"
    );
}

async fn case_concurrent_claims_of_one_task_have_one_winner(store: Store) {
    acme(&store).await;
    let queued = task("acme").create(&store).await;
    let claims = (0..20).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .transition(
                    queued.id,
                    &Step::new(TaskState::Queued, TaskState::Launching)
                        .message(format!("launcher-{n}")),
                    |_| None,
                    &|_, _| String::new(),
                )
                .await
        })
    });
    let won = join_all(claims)
        .await
        .into_iter()
        .filter_map(|joined| joined.unwrap().unwrap())
        .count();
    assert_eq!(won, 1);
    assert_eq!(store.events(queued.id, None).await.unwrap().len(), 2);
}

async fn case_a_note_records_why_a_task_waits(store: Store) {
    use TaskState::{Launched, Launching, Queued, Running};
    acme(&store).await;
    let queued = task("acme").create(&store).await;
    let launched = walk(&store, &queued, &[Launching, Launched]).await;
    let message = "0/9 nodes are available: 9 Insufficient nvidia.com/gpu";

    let noted = store
        .record_note(
            launched.id,
            &PlannedNote {
                state: Launched,
                reason: Reason::Unschedulable,
                message: (message).into(),
                at: jiff::Timestamp::now(),
            },
        )
        .await
        .unwrap()
        .expect("the note applies");
    assert_eq!(noted.state, Launched);
    assert_eq!(noted.reason, Some(Reason::Unschedulable));
    assert_eq!(noted.message.as_deref(), Some(message));
    assert_eq!(store.task(queued.id).await.unwrap(), Some(noted.clone()));

    // Noting it again changes nothing and writes no event.
    let again = store
        .record_note(
            launched.id,
            &PlannedNote {
                state: Launched,
                reason: Reason::Unschedulable,
                message: (message).into(),
                at: jiff::Timestamp::now(),
            },
        )
        .await
        .unwrap();
    assert_eq!(again, Some(noted.clone()));
    let events = store.events(queued.id, None).await.unwrap();
    assert_eq!(events.len(), 4);
    assert_eq!(events[3].from, Some(Launched));
    assert_eq!(events[3].to, Launched);
    assert_eq!(events[3].reason, Some(Reason::Unschedulable));

    // A task no longer in the noted state is left alone.
    assert_eq!(
        store
            .record_note(
                launched.id,
                &PlannedNote {
                    state: Queued,
                    reason: Reason::Unschedulable,
                    message: (message).into(),
                    at: jiff::Timestamp::now()
                }
            )
            .await
            .unwrap(),
        None
    );

    // Once it runs, the waiting reason is gone.
    let running = walk(&store, &noted, &[Running]).await;
    assert_eq!((running.reason, running.message.as_deref()), (None, None));

    let done = walk(&store, &running, &[TaskState::Succeeded]).await;
    let error = store
        .record_note(
            done.id,
            &PlannedNote {
                state: TaskState::Succeeded,
                reason: Reason::Unschedulable,
                message: (message).into(),
                at: jiff::Timestamp::now(),
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::IllegalTransition { .. }),
        "{error:?}"
    );
}

async fn case_events_tell_the_story_in_order(store: Store) {
    use TaskState::{Failed, Launched, Launching, Queued, Running};
    acme(&store).await;
    let queued = task("acme").create(&store).await;
    let id = queued.id;

    // The first attempt: its launch fails transiently and the task goes back to its queue.
    let launching = walk(&store, &queued, &[Launching]).await;
    let requeued = store
        .transition(
            id,
            &Step::new(Launching, Queued)
                .message("apiserver timeout")
                .attempt(2),
            |_| None,
            &|_, _| String::new(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(requeued.attempt, 2);
    assert_eq!(launching.attempt, 1);

    // The second attempt runs and fails with an exit code.
    let running = walk(&store, &requeued, &[Launching, Launched, Running]).await;
    assert_eq!(running.attempt, 2, "the attempt is kept when not given");
    assert_eq!(
        running.message, None,
        "a move clears the previous state's message"
    );
    let failed = store
        .transition(
            id,
            &Step::new(Running, Failed)
                .reason(Reason::ExitCode)
                .message("Traceback: ZeroDivisionError")
                .exit_code(3),
            |_| None,
            &|_, _| String::new(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.reason, Some(Reason::ExitCode));
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(store.get_task("acme", id).await.unwrap(), Some(failed));

    let events = store.events(id, None).await.unwrap();
    assert_eq!(
        moves(&events),
        [
            (None, Queued),
            (Some(Queued), Launching),
            (Some(Launching), Queued),
            (Some(Queued), Launching),
            (Some(Launching), Launched),
            (Some(Launched), Running),
            (Some(Running), Failed),
        ]
    );
    assert_eq!(
        events.iter().map(|e| e.attempt).collect::<Vec<_>>(),
        [1, 1, 2, 2, 2, 2, 2]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
    let last = &events[6];
    assert_eq!(last.reason, Some(Reason::ExitCode));
    assert_eq!(last.exit_code, Some(3));
    assert_eq!(
        last.message.as_deref(),
        Some("Traceback: ZeroDivisionError")
    );
    assert_eq!(events[2].message.as_deref(), Some("apiserver timeout"));
    assert_eq!(events[2].reason, None);

    // A cursor returns only what came after it.
    let after = store.events(id, Some(events[4].id)).await.unwrap();
    assert_eq!(after, events[5..]);
    assert!(
        store
            .events(id, Some(events[6].id))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn case_a_stale_claim_is_taken_by_one_launcher(store: Store) {
    acme(&store).await;
    let created = task("acme").create(&store).await;
    let claimed = walk(&store, &created, &[TaskState::Launching]).await;
    let now = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1);
    // Three launchers read the same stale claim and try at once: one takes it.
    let tries = (0..3).map(|_| {
        let store = store.clone();
        async move {
            store
                .take_stale_claim(claimed.id, claimed.updated_at, now)
                .await
                .unwrap()
        }
    });
    let taken = join_all(tries).await;
    assert_eq!(taken.iter().filter(|taken| **taken).count(), 1, "{taken:?}");
    // The claim is fresh again: a launcher with the old reading leaves it alone, one
    // that reads it stale again takes it.
    assert!(
        !store
            .take_stale_claim(claimed.id, claimed.updated_at, now)
            .await
            .unwrap()
    );
    let reread = store.get_task("acme", claimed.id).await.unwrap().unwrap();
    assert_eq!(reread.state, TaskState::Launching);
    assert!(reread.updated_at > claimed.updated_at);
    let later = now + jiff::SignedDuration::from_secs(1);
    assert!(
        store
            .take_stale_claim(claimed.id, reread.updated_at, later)
            .await
            .unwrap()
    );
    // Only a claim: a task in another state is never taken.
    let queued = task("acme").create(&store).await;
    assert!(
        !store
            .take_stale_claim(queued.id, queued.updated_at, later)
            .await
            .unwrap()
    );
}
