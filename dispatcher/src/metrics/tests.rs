//! The registry as a whole: names, help, labels and the documentation table, bounded
//! label values, and the exposition of every family populated through the recording
//! methods.

use std::time::Duration;

use super::*;
use crate::task::{Reason, TaskState};

#[test]
fn every_family_has_help_and_a_unit_or_count_name() {
    let metrics = Metrics::new("local");
    let described = metrics.described();
    assert!(described.len() > 30, "{described:?}");
    for family in described {
        assert!(
            family.name.starts_with("agent_bus_") || family.name.starts_with("process_"),
            "{family:?}"
        );
        assert!(family.help.len() > 10, "{family:?}");
        let unit_or_count = [
            "_seconds",
            "_bytes",
            "_dollars",
            "_ratio",
            "_total",
            "_per_hour",
            "_info",
            "_fds",
            "_connections",
            "_attempts",
        ]
        .iter()
        .any(|suffix| family.name.ends_with(suffix))
            || family.kind == Kind::Gauge;
        assert!(unit_or_count, "{family:?}");
        assert_eq!(
            family.name.ends_with("_total"),
            family.kind == Kind::Counter,
            "only counters end in _total: {family:?}"
        );
    }
    // Families with samples are in the text under the described names.
    let text = metrics.encode().unwrap_or_default();
    for name in family_names(&text) {
        assert!(
            described.iter().any(|family| family.name == name),
            "{name} is described"
        );
    }
    assert!(text.contains("agent_bus_build_info{version=\""));
}

/// The label names of every sample line equal its family's described labels.
#[test]
fn samples_carry_exactly_the_described_labels() {
    let metrics = Metrics::new("kubernetes");
    metrics.error(ErrorComponent::Store, "transition");
    metrics.kubernetes().request(
        KubernetesVerb::Create,
        "jobs",
        Some(201),
        Duration::from_millis(2),
    );
    metrics.store_query("transition", true, Duration::from_millis(2));
    metrics.queue_operation(QueueOperation::Enqueue, true, Duration::from_millis(2));
    metrics.cost("acme", "gpu", CostResource::Gpu, 1.5);
    let _in_flight = metrics.tasks().launch_in_flight();
    let text = metrics.encode().unwrap_or_default();
    let mut checked = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _) = line.split_once(' ').unwrap_or((line, ""));
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let mut keys: Vec<&str> = labels
            .trim_end_matches('}')
            .split(',')
            .filter(|pair| !pair.is_empty())
            .filter_map(|pair| pair.split_once('=').map(|(k, _)| k))
            .collect();
        let family = metrics
            .described()
            .iter()
            .find(|f| {
                f.name == name
                    || (f.kind == Kind::Histogram
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suffix| name == format!("{}{suffix}", f.name)))
                    || (f.kind == Kind::Counter
                        && name == format!("{}_created", f.name.trim_end_matches("_total")))
            })
            .unwrap_or_else(|| panic!("{name} is described"));
        keys.retain(|k| *k != "le");
        let mut described: Vec<&str> = family.labels.to_vec();
        keys.sort_unstable();
        described.sort_unstable();
        assert_eq!(keys, described, "{line}");
        checked += 1;
    }
    assert!(checked > 10, "{text}");
}

/// docs/OBSERVABILITY.md lists exactly these families, between its markers. On a
/// mismatch the expected table is written to `$TMPDIR/agent-bus-metrics-reference.md`
/// to paste.
#[test]
fn the_documentation_lists_every_family() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docs = std::fs::read_to_string(root.join("docs/OBSERVABILITY.md")).unwrap_or_default();
    let start = "<!-- metrics-reference:start -->\n";
    let end = "<!-- metrics-reference:end -->";
    let documented = docs
        .split_once(start)
        .and_then(|(_, rest)| rest.split_once(end))
        .map(|(table, _)| table.to_owned())
        .unwrap_or_default();
    let expected = reference_table(Metrics::new("local").described());
    if documented != expected {
        let out = std::env::temp_dir().join("agent-bus-metrics-reference.md");
        let _ = std::fs::write(&out, &expected);
        panic!(
            "docs/OBSERVABILITY.md's metrics reference differs from the code; the table to paste between its markers is in {}",
            out.display()
        );
    }
}

#[test]
fn client_chosen_label_values_are_bounded() {
    let metrics = Metrics::default();
    for i in 0..MAX_LABEL_VALUES {
        assert_eq!(metrics.bounded("model", &format!("m{i}")), format!("m{i}"));
    }
    assert_eq!(metrics.bounded("model", "one-too-many"), OTHER);
    assert_eq!(metrics.bounded("model", "m3"), "m3", "known values stay");
    assert_eq!(metrics.bounded("tenant", "acme"), "acme", "per family");
}

#[test]
fn expected_kubernetes_answers_are_not_errors() {
    let metrics = Metrics::default();
    let kubernetes = metrics.kubernetes();
    let took = Duration::from_millis(3);
    kubernetes.request(KubernetesVerb::Create, "jobs", Some(409), took);
    kubernetes.request(KubernetesVerb::Get, "jobs", Some(404), took);
    kubernetes.request(KubernetesVerb::Create, "jobs", Some(500), took);
    kubernetes.request(KubernetesVerb::List, "pods", None, took);
    let text = metrics.encode().unwrap_or_default();
    assert!(
        text.contains(r#"agent_bus_errors_total{component="kubernetes",kind="http_500"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"agent_bus_errors_total{component="kubernetes",kind="http_error"} 1"#));
    assert!(!text.contains("http_409"));
}

/// Records into every family once through the recording methods (the gauges as the
/// snapshot sets them).
fn populated() -> Metrics {
    let metrics = Metrics::new("kubernetes");
    let took = Duration::from_millis(2);
    let http = metrics.http();
    http.request(
        &axum::http::Method::POST,
        "/v1/tasks",
        axum::http::StatusCode::CREATED,
        Duration::from_millis(20),
    );
    http.readiness_check(super::ReadinessResult::Ready);
    metrics.error(ErrorComponent::Api, "http_500");

    let tasks = metrics.tasks();
    tasks.submitted("acme", "gpu");
    tasks.idempotent_replay("acme");
    tasks.refused_over_budget("acme", crate::cost::Period::Day);
    tasks.refused_over_budget("acme", crate::cost::Period::Month);
    tasks.launched("gpu", Some("a100"));
    tasks.launched("cpu", None);
    tasks.launch_failed("gpu", LaunchFailure::Transient);
    tasks.launch_failed("gpu", LaunchFailure::Permanent);
    tasks.launch_failed("gpu", LaunchFailure::ClusterQuota);
    tasks.finished("gpu", TaskState::Failed, Some(Reason::LaunchRejected));
    tasks.finished("gpu", TaskState::Succeeded, None);
    tasks.finished("gpu", TaskState::TimedOut, None);
    tasks.stage(Stage::QueuedToLaunched, "gpu", 3.0);
    tasks.stage(Stage::LaunchedToRunning, "gpu", 40.0);
    tasks.stage(Stage::RunningToFinished, "gpu", 5000.0);
    tasks.attempt_failed(
        "gpu",
        crate::task::retry::FailureClass::Xid,
        crate::task::retry::RetryAction::Retry,
    );
    tasks.attempts_taken("gpu", 3);
    let in_flight = tasks.launch_in_flight();
    drop(tasks.launch_in_flight());

    for operation in [
        QueueOperation::Enqueue,
        QueueOperation::Receive,
        QueueOperation::Ack,
        QueueOperation::Reclaim,
        QueueOperation::Pending,
        QueueOperation::Ping,
    ] {
        metrics.queue_operation(operation, true, Duration::from_millis(4));
    }
    metrics.queue_operation(QueueOperation::Ack, false, Duration::from_millis(4));

    let kubernetes = metrics.kubernetes();
    kubernetes.request(KubernetesVerb::Create, "jobs", Some(201), took);
    kubernetes.request(KubernetesVerb::Create, "jobs", Some(409), took);
    kubernetes.request(KubernetesVerb::Get, "jobs", Some(500), took);
    kubernetes.request(KubernetesVerb::Watch, "pods", None, took);
    kubernetes.request(
        KubernetesVerb::DeleteCollection,
        "pods/log",
        Some(200),
        took,
    );
    kubernetes.request(KubernetesVerb::Other, "other", Some(200), took);
    kubernetes.watch_event(WatchedObject::Job);
    kubernetes.watch_event(WatchedObject::Pod);
    kubernetes.job_deleted(crate::metrics::JobDeletion::OutcomeRecorded);
    kubernetes.job_delete_failed();
    kubernetes.watch_failed();

    metrics.store_query("transition", true, took);
    metrics.store_query("insert_task", false, took);
    metrics.store_pool_connections(PoolState::InUse, 2);
    metrics.store_pool_connections(PoolState::Idle, 3);
    metrics.store_pool_connections(PoolState::Max, 10);
    metrics.error(ErrorComponent::Store, "snapshot");

    let reports = metrics.reports();
    for kind in [
        ReportKind::Started,
        ReportKind::Progress,
        ReportKind::Usage,
        ReportKind::Finished,
    ] {
        reports.received(kind);
    }
    let usage = protocol::Usage {
        model: "gpt".to_owned(),
        calls: 3,
        input_tokens: 100,
        output_tokens: 50,
        cost_usd: 0.25,
    };
    reports.llm_usage("acme", "gpu", &usage);
    let compute = crate::cost::Breakdown {
        gpu: 2.0,
        cpu: 0.5,
        memory: 0.125,
    };
    metrics.compute_cost("acme", "gpu", &compute);
    for result in [
        super::DeliveryResult::Delivered,
        super::DeliveryResult::Retried,
        super::DeliveryResult::GivenUp,
        super::DeliveryResult::Refused,
    ] {
        metrics.webhooks().attempt(result);
    }

    let gauges = &metrics.inner.gauges;
    for state in TaskState::ALL {
        gauges
            .tasks
            .get_or_create(&gauges::StateLabels { state })
            .set(7);
    }
    let queue = gauges::QueueLabels {
        queue: "gpu".to_owned(),
    };
    gauges.queue_depth.get_or_create(&queue).set(4);
    gauges.queue_oldest_age.get_or_create(&queue).set(12.5);
    for reason in [
        "queued_too_long",
        "launching_stale",
        "unschedulable",
        "heartbeat_lost",
    ] {
        gauges
            .stuck_tasks
            .get_or_create(&gauges::StuckLabels { reason })
            .set(1);
    }
    let class = gauges::GpuClassLabels {
        gpu_class: "a100".to_owned(),
    };
    gauges.gpus_allocated.get_or_create(&class).set(8);
    gauges.gpus_reporting.get_or_create(&class).set(6);
    gauges.gpu_utilization.get_or_create(&class).set(0.75);
    gauges.gpu_memory_used.get_or_create(&class).set(1e9);
    gauges
        .cost_rate
        .get_or_create(&gauges::TenantQueueLabels {
            tenant: "acme".to_owned(),
            queue: "gpu".to_owned(),
        })
        .set(3.5);
    let budget = |period: crate::cost::Period| gauges::BudgetLabels {
        tenant: "acme".to_owned(),
        period: labels::BudgetPeriod::from(period),
    };
    gauges
        .tenant_spend
        .get_or_create(&budget(crate::cost::Period::Day))
        .set(10.0);
    gauges
        .tenant_budget
        .get_or_create(&budget(crate::cost::Period::Month))
        .set(100.0);
    gauges
        .waiting_on_quota
        .get_or_create(&gauges::TenantLabels {
            tenant: "acme".to_owned(),
        })
        .set(2);
    gauges.cost_rate_alert_threshold.set(50.0);
    gauges.snapshot_age.set(1.5);
    // Still in flight when the text is encoded.
    std::mem::forget(in_flight);
    metrics
}

/// Every family has samples once each recording method ran; the text is written to
/// `$METRICS_EXPOSITION_OUT` when set, to compare expositions across changes.
#[test]
fn every_family_is_recorded_by_a_method() {
    let metrics = populated();
    let text = metrics.encode().unwrap_or_default();
    if let Ok(out) = std::env::var("METRICS_EXPOSITION_OUT") {
        let _ = std::fs::write(out, &text);
    }
    for family in metrics.described() {
        let base = family.name.trim_end_matches("_total");
        let sampled = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .any(|line| line.starts_with(base));
        assert!(sampled, "{} has no sample:\n{text}", family.name);
    }
    assert!(
        text.contains(
            r#"agent_bus_tasks_finished_total{queue="gpu",outcome="succeeded",reason="none"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("agent_bus_launches_in_flight 1\n"), "{text}");
    assert!(
        text.contains(r#"agent_bus_errors_total{component="launcher",kind="permanent"} 1"#),
        "{text}"
    );
}
