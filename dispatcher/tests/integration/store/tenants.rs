//! Tenants as an operator manages them: listed by name, a key replaced (the old one no
//! longer finds the tenant, at once), disabled and enabled (a disabled tenant's queued
//! tasks are not claimed, not chosen and not offered again until it is enabled).

use dispatcher::store::{Store, StoreError};
use dispatcher::task::lifecycle::{PlannedNote, Step};
use dispatcher::task::quota::OverQuota;
use dispatcher::task::{Reason, TaskState};

use super::support::*;

both_backends!(
    case_tenants_are_listed_by_name,
    case_a_replaced_key_no_longer_finds_its_tenant,
    case_a_disabled_tenants_tasks_wait_until_it_is_enabled,
);

async fn case_tenants_are_listed_by_name(store: Store) {
    assert!(store.tenants().await.unwrap().is_empty());
    tenant(&store, "globex", 5).await;
    acme(&store).await;
    let tenants = store.tenants().await.unwrap();
    let names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["acme", "globex"]);
    assert_eq!(tenants[1].max_queued_tasks, 5);
    assert!(tenants.iter().all(|t| t.disabled_at.is_none()));
}

async fn case_a_replaced_key_no_longer_finds_its_tenant(store: Store) {
    store.create_tenant("acme", "old-hash", 10).await.unwrap();
    store
        .create_tenant("globex", "globex-hash", 10)
        .await
        .unwrap();
    store.replace_api_key("acme", "new-hash").await.unwrap();
    assert_eq!(store.tenant_by_key_hash("old-hash").await.unwrap(), None);
    assert_eq!(
        store
            .tenant_by_key_hash("new-hash")
            .await
            .unwrap()
            .map(|t| t.name),
        Some("acme".to_owned())
    );
    assert!(matches!(
        store.replace_api_key("acme", "globex-hash").await,
        Err(StoreError::ApiKeyInUse { .. })
    ));
    assert!(matches!(
        store.replace_api_key("nobody", "x").await,
        Err(StoreError::UnknownTenant { .. })
    ));
}

fn claim() -> Step {
    let mut step = Step::new(TaskState::Queued, TaskState::Launching);
    step.claimable_only = true;
    step.within_quota = true;
    step
}

async fn case_a_disabled_tenants_tasks_wait_until_it_is_enabled(store: Store) {
    acme(&store).await;
    tenant(&store, "globex", 10).await;
    let first = task("acme").create(&store).await;
    let other = task("globex").create(&store).await;
    let at = jiff::Timestamp::now();
    let disabled = store.set_tenant_disabled("acme", Some(at)).await.unwrap();
    assert!(disabled.disabled_at.is_some());
    // Disabling again keeps the first time.
    let again = store
        .set_tenant_disabled("acme", Some(at + jiff::SignedDuration::from_hours(1)))
        .await
        .unwrap();
    assert_eq!(again.disabled_at, disabled.disabled_at);
    assert!(matches!(
        store.set_tenant_disabled("nobody", None).await,
        Err(StoreError::UnknownTenant { .. })
    ));

    // Its task is not claimed (nothing is written), another tenant's is.
    match store
        .transition(first.id, &claim(), |_| None, &|_, _| String::new())
        .await
    {
        Err(StoreError::OverQuota {
            task_id,
            source: OverQuota::Disabled { tenant },
        }) => assert_eq!((task_id, tenant.as_str()), (first.id, "acme")),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.task(first.id).await.unwrap().unwrap().state,
        TaskState::Queued
    );
    assert!(
        store
            .transition(other.id, &claim(), |_| None, &|_, _| String::new())
            .await
            .unwrap()
            .is_some()
    );
    // The fair choice counts it as at its quota; held, it is not offered again.
    let candidates = store
        .fair_candidates("default", (-1000, 1000))
        .await
        .unwrap();
    let acme_candidate = candidates.iter().find(|c| c.tenant == "acme").unwrap();
    assert!(acme_candidate.at_quota);
    store
        .record_note(
            first.id,
            &PlannedNote {
                state: TaskState::Queued,
                reason: Reason::TenantQuota,
                message: "tenant 'acme' is disabled".into(),
                at: jiff::Timestamp::now(),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(store.held_with_room().await.unwrap().is_empty());

    // Enabled: offered again and claimed.
    let enabled = store.set_tenant_disabled("acme", None).await.unwrap();
    assert_eq!(enabled.disabled_at, None);
    assert_eq!(ids(&store.held_with_room().await.unwrap()), [first.id]);
    assert!(
        store
            .transition(first.id, &claim(), |_| None, &|_, _| String::new())
            .await
            .unwrap()
            .is_some()
    );
}
