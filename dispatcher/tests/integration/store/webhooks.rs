//! The webhook outbox: a state change writes its delivery in its own transaction (the
//! task's webhook, else the tenant's default, only for the events it wants); claims are
//! exclusive under a lease that a dead sender leaves to expire; attempts are recorded
//! only under the claim's lease and kept bounded.

use std::time::Duration;

use dispatcher::store::{AfterAttempt, DeliveryAttempt, DeliveryState, KEPT_ATTEMPTS, Store};
use dispatcher::task::lifecycle::Step;
use dispatcher::task::webhook::{WebhookEvent, WebhookSpec};
use dispatcher::task::{Task, TaskState};

use super::support::*;

both_backends!(
    case_a_state_change_writes_its_delivery,
    case_claims_are_exclusive_until_the_lease_runs_out,
    case_attempts_are_recorded_under_the_lease_and_kept_bounded,
    case_tenant_webhook_settings_and_secret,
);

/// Moves `task` to `to`, rendering delivery bodies as `<event type> <task id>`.
async fn move_to(store: &Store, task: &Task, to: TaskState) -> Task {
    store
        .transition(
            task.id,
            &Step::new(task.state, to),
            |_| None,
            &|task: &Task, event_type: &'static str| format!("{event_type} {}", task.id),
        )
        .await
        .unwrap()
        .unwrap()
}

async fn case_a_state_change_writes_its_delivery(store: Store) {
    acme(&store).await;
    let own = task("acme")
        .with(|t| t.webhook("https://hooks.example.com/own", &["terminal", "started"]))
        .create(&store)
        .await;
    let plain = task("acme").create(&store).await;
    let started_only = task("acme")
        .with(|t| t.webhook("https://hooks.example.com/started", &["started"]))
        .create(&store)
        .await;

    // Claims and launches are no event; running is `started`, the end `terminal`.
    let mut current = own.clone();
    for to in [
        TaskState::Launching,
        TaskState::Launched,
        TaskState::Running,
        TaskState::Succeeded,
    ] {
        current = move_to(&store, &current, to).await;
    }
    let deliveries = store.task_deliveries(own.id, 100).await.unwrap();
    let types: Vec<&str> = deliveries
        .iter()
        .map(|(d, _)| d.event_type.as_str())
        .collect();
    assert_eq!(types, ["task.started", "task.succeeded"]);
    let (succeeded, attempts) = &deliveries[1];
    assert!(succeeded.id.starts_with("msg_"), "{}", succeeded.id);
    assert_eq!(succeeded.url, "https://hooks.example.com/own");
    assert_eq!(succeeded.body, format!("task.succeeded {}", own.id));
    assert_eq!(succeeded.state, DeliveryState::Pending);
    assert_eq!((succeeded.attempts, attempts.len()), (0, 0));
    assert_eq!(succeeded.tenant, "acme");

    // No webhook and no tenant default: nothing. With a default: the default's URL.
    move_to(&store, &plain, TaskState::Cancelled).await;
    assert!(
        store
            .task_deliveries(plain.id, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let default = WebhookSpec {
        url: "https://hooks.example.com/default".into(),
        events: vec![WebhookEvent::Terminal],
    };
    store
        .set_tenant_webhook("acme", Some(&default))
        .await
        .unwrap();
    let later = task("acme").create(&store).await;
    move_to(&store, &later, TaskState::Cancelled).await;
    let deliveries = store.task_deliveries(later.id, 100).await.unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].0.url, "https://hooks.example.com/default");
    assert_eq!(deliveries[0].0.event_type, "task.cancelled");

    // A task's own webhook wins over the default, with its own events.
    move_to(&store, &started_only, TaskState::Cancelled).await;
    assert!(
        store
            .task_deliveries(started_only.id, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn case_claims_are_exclusive_until_the_lease_runs_out(store: Store) {
    acme(&store).await;
    let hooked = task("acme")
        .with(|t| t.webhook("https://hooks.example.com/x", &["terminal"]))
        .create(&store)
        .await;
    move_to(&store, &hooked, TaskState::Cancelled).await;
    let now = jiff::Timestamp::now();
    let lease = Duration::from_secs(30);
    let first = store.claim_deliveries(now, lease, 16).await.unwrap();
    assert_eq!(first.len(), 1);
    assert!(
        store
            .claim_deliveries(now, lease, 16)
            .await
            .unwrap()
            .is_empty(),
        "claimed: no one else gets it"
    );
    // The sender died: once its lease is over the delivery is claimed again, same id.
    let after = now + jiff::SignedDuration::from_secs(31);
    let second = store.claim_deliveries(after, lease, 16).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].delivery.id, first[0].delivery.id);
    assert_eq!(second[0].delivery.body, first[0].delivery.body);
    assert_ne!(second[0].lease_token, first[0].lease_token);

    // The first sender comes back: its record is refused, the second's is taken.
    let attempt = DeliveryAttempt {
        attempt: 1,
        at: after,
        status_code: Some(200),
        error: None,
        duration_ms: 12,
    };
    assert!(
        !store
            .finish_delivery_attempt(&first[0], &attempt, AfterAttempt::Delivered)
            .await
            .unwrap()
    );
    assert!(
        store
            .finish_delivery_attempt(&second[0], &attempt, AfterAttempt::Delivered)
            .await
            .unwrap()
    );
    let far = after + jiff::SignedDuration::from_hours(1);
    assert!(
        store
            .claim_deliveries(far, lease, 16)
            .await
            .unwrap()
            .is_empty(),
        "delivered"
    );
    let (delivery, attempts) = &store.task_deliveries(hooked.id, 100).await.unwrap()[0];
    assert_eq!(delivery.state, DeliveryState::Delivered);
    assert_eq!(
        delivery.delivered_at.map(jiff::Timestamp::as_millisecond),
        Some(after.as_millisecond())
    );
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status_code, Some(200));

    // A batch is bounded.
    for _ in 0..5 {
        let t = task("acme")
            .with(|t| t.webhook("https://hooks.example.com/x", &["terminal"]))
            .create(&store)
            .await;
        move_to(&store, &t, TaskState::Cancelled).await;
    }
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(2);
    assert_eq!(
        store.claim_deliveries(later, lease, 3).await.unwrap().len(),
        3
    );
    assert_eq!(
        store.claim_deliveries(later, lease, 3).await.unwrap().len(),
        2
    );
}

async fn case_attempts_are_recorded_under_the_lease_and_kept_bounded(store: Store) {
    acme(&store).await;
    let hooked = task("acme")
        .with(|t| t.webhook("https://hooks.example.com/x", &["terminal"]))
        .create(&store)
        .await;
    move_to(&store, &hooked, TaskState::Cancelled).await;
    let lease = Duration::from_secs(30);
    let mut now = jiff::Timestamp::now();
    let total = KEPT_ATTEMPTS + 5;
    for n in 1..=total {
        let claimed = store.claim_deliveries(now, lease, 16).await.unwrap();
        assert_eq!(claimed.len(), 1, "attempt {n}");
        let next = now + jiff::SignedDuration::from_secs(1);
        let after = if n == total {
            AfterAttempt::GiveUp
        } else {
            AfterAttempt::RetryAt(next)
        };
        let attempt = DeliveryAttempt {
            attempt: n,
            at: now,
            status_code: Some(503),
            error: Some(format!("answered 503 ({n})")),
            duration_ms: 5,
        };
        assert!(
            store
                .finish_delivery_attempt(&claimed[0], &attempt, after)
                .await
                .unwrap()
        );
        // Not due before its next attempt.
        assert!(
            store
                .claim_deliveries(now, lease, 16)
                .await
                .unwrap()
                .is_empty()
        );
        now = next;
    }
    let far = now + jiff::SignedDuration::from_hours(100);
    assert!(
        store
            .claim_deliveries(far, lease, 16)
            .await
            .unwrap()
            .is_empty(),
        "given up"
    );
    let (delivery, attempts) = &store.task_deliveries(hooked.id, 100).await.unwrap()[0];
    assert_eq!(delivery.state, DeliveryState::Failed);
    assert!(delivery.given_up_at.is_some());
    assert_eq!(delivery.attempts, total);
    assert_eq!(
        delivery.last_error.as_deref(),
        Some(format!("answered 503 ({total})").as_str())
    );
    assert_eq!(
        attempts.len(),
        KEPT_ATTEMPTS as usize,
        "only the latest are kept"
    );
    assert_eq!(attempts.last().map(|a| a.attempt), Some(total));
    assert_eq!(attempts[0].attempt, total - KEPT_ATTEMPTS + 1);
}

async fn case_tenant_webhook_settings_and_secret(store: Store) {
    acme(&store).await;
    assert_eq!(store.tenant_webhook("acme").await.unwrap(), None);
    let spec = WebhookSpec {
        url: "https://hooks.example.com/default".into(),
        events: vec![WebhookEvent::Terminal, WebhookEvent::Retrying],
    };
    store.set_tenant_webhook("acme", Some(&spec)).await.unwrap();
    assert_eq!(store.tenant_webhook("acme").await.unwrap(), Some(spec));
    store.set_tenant_webhook("acme", None).await.unwrap();
    assert_eq!(store.tenant_webhook("acme").await.unwrap(), None);
    assert!(store.set_tenant_webhook("nobody", None).await.is_err());

    assert_eq!(store.tenant_webhook_secret("acme").await.unwrap(), None);
    let made = store
        .webhook_secret("acme", false, || "whsec_one".into())
        .await
        .unwrap();
    assert_eq!(made, "whsec_one");
    let kept = store
        .webhook_secret("acme", false, || "whsec_two".into())
        .await
        .unwrap();
    assert_eq!(kept, "whsec_one", "an existing secret is kept");
    let rotated = store
        .webhook_secret("acme", true, || "whsec_three".into())
        .await
        .unwrap();
    assert_eq!(rotated, "whsec_three");
    assert!(
        store
            .webhook_secret("nobody", false, || "whsec_x".into())
            .await
            .is_err()
    );
}
