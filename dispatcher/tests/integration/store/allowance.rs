//! What a task attempt's runner may report (the allowance, the end of the attempt), and
//! the local executor's task user slots.

use dispatcher::store::{Exhausted, Recording, ReportAllowance, Store};
use dispatcher::task::TaskState;
use protocol::{Finished, Progress, Report, ReportBody, Started};

use super::support::*;

both_backends!(
    case_an_attempt_takes_reports_up_to_its_allowance,
    case_an_ended_attempt_takes_reports_only_for_a_while,
    case_each_tenant_gets_a_slot_of_its_own_once,
);

fn report(sequence: u64, body: ReportBody) -> Report {
    Report {
        sequence,
        sent_at: "2026-12-02T12:00:00Z".to_owned(),
        body,
    }
}

fn progress(sequence: u64) -> Report {
    report(
        sequence,
        ReportBody::Progress(Progress {
            percent: 1.0,
            message: Some("x".repeat(100)),
        }),
    )
}

fn allowance(max_reports: u64, max_bytes: u64) -> ReportAllowance {
    ReportAllowance {
        max_reports,
        max_bytes,
        ..ReportAllowance::default()
    }
}

async fn running_task(store: &Store) -> dispatcher::task::Task {
    acme(store).await;
    let task = task("acme").create(store).await;
    walk(
        store,
        &task,
        &[
            TaskState::Launching,
            TaskState::Launched,
            TaskState::Running,
        ],
    )
    .await
}

async fn case_an_attempt_takes_reports_up_to_its_allowance(store: Store) {
    let task = running_task(&store).await;
    let three = allowance(3, 1 << 20);
    let recorded = store
        .record_reports(task.id, 1, &[progress(1), progress(2)], &three)
        .await
        .unwrap()
        .recorded()
        .unwrap();
    assert_eq!(recorded.accepted, 2);
    // Two more would be four: the batch is refused whole.
    let refused = store
        .record_reports(task.id, 1, &[progress(3), progress(4)], &three)
        .await
        .unwrap();
    assert_eq!(refused, Recording::Exhausted(Exhausted::Reports(3)));
    // Started, finished, heartbeats and resends do not count against it.
    let lifecycle = [
        report(10, ReportBody::Started(Started::default())),
        report(11, ReportBody::Heartbeat(protocol::Heartbeat::default())),
        report(12, ReportBody::Finished(Finished::default())),
        progress(1),
        progress(3),
    ];
    let recorded = store
        .record_reports(task.id, 1, &lifecycle, &three)
        .await
        .unwrap()
        .recorded()
        .unwrap();
    assert_eq!((recorded.accepted, recorded.duplicates), (4, 1));
    let refused = store
        .record_reports(task.id, 1, &[progress(4)], &three)
        .await
        .unwrap();
    assert_eq!(refused, Recording::Exhausted(Exhausted::Reports(3)));
    let summary = store.report_summary(task.id, 1).await.unwrap();
    assert_eq!(summary.stored, 5, "three progress, started and finished");
    assert!(summary.stored_bytes > 300, "{}", summary.stored_bytes);
    // Bytes: a report of about 150 bytes goes past 200.
    let small = allowance(100, summary.stored_bytes + 200);
    let refused = store
        .record_reports(task.id, 1, &[progress(20), progress(21)], &small)
        .await
        .unwrap();
    assert_eq!(
        refused,
        Recording::Exhausted(Exhausted::Bytes(summary.stored_bytes + 200))
    );
    // Started and finished have a bound of their own.
    let many: Vec<Report> = (100..100 + ReportAllowance::MAX_LIFECYCLE_REPORTS)
        .map(|seq| report(seq, ReportBody::Started(Started::default())))
        .collect();
    let refused = store
        .record_reports(task.id, 1, &many, &three)
        .await
        .unwrap();
    assert_eq!(
        refused,
        Recording::Exhausted(Exhausted::LifecycleReports(
            ReportAllowance::MAX_LIFECYCLE_REPORTS
        ))
    );
}

async fn case_an_ended_attempt_takes_reports_only_for_a_while(store: Store) {
    let task = running_task(&store).await;
    walk(&store, &task, &[TaskState::Failed]).await;
    let finished = [report(5, ReportBody::Finished(Finished::default()))];
    // The runner's last reports, right after the end: taken.
    let recorded = store
        .record_reports(task.id, 1, &finished, &ReportAllowance::default())
        .await
        .unwrap();
    assert!(matches!(recorded, Recording::Recorded(_)), "{recorded:?}");
    let no_grace = ReportAllowance {
        after_end: jiff::SignedDuration::ZERO,
        ..ReportAllowance::default()
    };
    // Later: refused, resends too.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let refused = store
        .record_reports(task.id, 1, &finished, &no_grace)
        .await
        .unwrap();
    assert!(
        matches!(refused, Recording::AttemptOver { ended_at: Some(_) }),
        "{refused:?}"
    );
    let refused = store
        .record_reports(task.id, 2, &finished, &ReportAllowance::default())
        .await
        .unwrap();
    assert_eq!(refused, Recording::AttemptOver { ended_at: None });
    let ghost = dispatcher::task::TaskId::new();
    let none = store
        .record_reports(ghost, 1, &finished, &ReportAllowance::default())
        .await
        .unwrap();
    assert_eq!(none, Recording::NoTask);
}

async fn case_each_tenant_gets_a_slot_of_its_own_once(store: Store) {
    let names: Vec<String> = (0..8).map(|i| format!("tenant-{i}")).collect();
    let asks = names.iter().map(|name| {
        let store = store.clone();
        let name = name.clone();
        tokio::spawn(async move { store.local_task_slot(&name).await.unwrap() })
    });
    let mut slots = Vec::new();
    for ask in asks {
        slots.push(ask.await.unwrap());
    }
    let mut distinct = slots.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct, (0..8).collect::<Vec<u32>>(), "{slots:?}");
    for (name, slot) in names.iter().zip(&slots) {
        assert_eq!(store.local_task_slot(name).await.unwrap(), *slot);
    }
    acme(&store).await;
    assert_eq!(store.tenant_count().await.unwrap(), 1);
}
