//! `GET /metrics` after real traffic and real transitions: requests by route template,
//! state read from the store, launches, outcomes, stage latencies and the settled cost.

use std::time::Duration;

use crate::common::{Db, api_on, on_both_stores, task_body};
use axum::http::{Method, StatusCode};
use dispatcher::task::{TaskId, TaskState};
use serde_json::json;

use super::support::*;

on_both_stores!(
    metrics_count_requests_by_route_template_and_read_state_from_the_store,
    transitions_count_launches_outcomes_stages_and_settle_the_cost,
);

async fn metrics_count_requests_by_route_template_and_read_state_from_the_store(db: Db) {
    let api = api_on(db.store.clone(), |_| {}).await;
    assert_eq!(
        api.state.snapshot.max_age,
        Duration::ZERO,
        "test APIs read the state gauges at every scrape"
    );
    let acme = api.tenant("acme", 100).await;
    let mut ids = Vec::new();
    for (name, queue) in [("a", None), ("b", None), ("c", Some("gpu"))] {
        let mut body = task_body(name);
        if let Some(queue) = queue {
            body["queue"] = json!(queue);
        }
        ids.push(id_of(&submit_ok(&api, &acme, &body).await));
    }
    // One task under an idempotency key, and two replays of it.
    let keyed = task_body("keyed").to_string();
    let headers = [("idempotency-key", "job-7")];
    for expected in [StatusCode::CREATED, StatusCode::OK, StatusCode::OK] {
        let (status, _, body) = api
            .call(
                Method::POST,
                "/v1/tasks",
                Some(&acme),
                Some(&keyed),
                &headers,
            )
            .await;
        assert_eq!(status, expected, "{body}");
        if status == StatusCode::CREATED {
            ids.push(id_of(&body));
        }
    }
    // Reads: a task, a task that is not there, a path that is not a route, no key.
    read(&api, &acme, &ids[0]).await;
    let (status, _) = api
        .get(&acme, &format!("/v1/tasks/{}", TaskId::new()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api.get(&acme, &format!("/v1/nothing/{}", ids[1])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = api.call(Method::GET, "/v1/tasks", None, None, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let text = scrape(&api).await;
    let requests = "agent_bus_http_requests_total";
    for (method, route, status, count) in [
        ("POST", "/v1/tasks", "201", 4.0),
        ("POST", "/v1/tasks", "200", 2.0),
        ("GET", "/v1/tasks/{id}", "200", 1.0),
        ("GET", "/v1/tasks/{id}", "404", 1.0),
        ("GET", "unmatched", "404", 1.0),
        ("GET", "/v1/tasks", "401", 1.0),
    ] {
        assert_eq!(
            value(
                &text,
                requests,
                &[("method", method), ("route", route), ("status", status)]
            ),
            count,
            "{method} {route} {status}"
        );
    }
    let templates = [
        "/v1/tasks",
        "/v1/tasks/{id}",
        "/v1/tasks/{id}/cancel",
        "/v1/tasks/{id}/events",
        "/internal/v1/tasks/{id}/attempts/{attempt}/reports",
        "/v1/usage",
        "/openapi.json",
        "/healthz",
        "/readyz",
        "/metrics",
        "unmatched",
    ];
    for sample in matching(&text, requests, &[]) {
        assert!(
            templates.contains(&sample.labels["route"].as_str()),
            "a route label that is not a template: {sample:?}"
        );
    }
    assert_eq!(
        value(
            &text,
            "agent_bus_http_request_duration_seconds_count",
            &[("method", "POST"), ("route", "/v1/tasks")]
        ),
        6.0
    );
    assert!(text.contains("# TYPE agent_bus_http_requests counter"));
    assert_eq!(
        value(
            &text,
            "agent_bus_tasks_submitted_total",
            &[("tenant", "acme"), ("queue", "default")]
        ),
        3.0,
        "replays are not submissions"
    );
    assert_eq!(
        value(
            &text,
            "agent_bus_tasks_submitted_total",
            &[("tenant", "acme"), ("queue", "gpu")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "agent_bus_idempotency_key_hits_total",
            &[("tenant", "acme")]
        ),
        2.0
    );
    assert_eq!(value(&text, "agent_bus_tasks", &[("state", "queued")]), 4.0);
    for state in ["launching", "launched", "running", "succeeded", "cancelled"] {
        assert_eq!(
            value(&text, "agent_bus_tasks", &[("state", state)]),
            0.0,
            "every state is listed: {state}"
        );
    }
    assert_eq!(
        value(&text, "agent_bus_queue_depth", &[("queue", "default")]),
        3.0
    );
    assert_eq!(
        value(&text, "agent_bus_queue_depth", &[("queue", "gpu")]),
        1.0
    );
    for queue in ["default", "gpu"] {
        let age = value(
            &text,
            "agent_bus_queue_oldest_age_seconds",
            &[("queue", queue)],
        );
        assert!((0.0..600.0).contains(&age), "{queue}: {age}");
    }
    assert_eq!(
        value(
            &text,
            "agent_bus_stuck_tasks",
            &[("reason", "queued_too_long")]
        ),
        0.0
    );
    assert_eq!(
        value(&text, "agent_bus_store_snapshot_age_seconds", &[]),
        0.0
    );
    assert_eq!(
        value(&text, "agent_bus_build_info", &[("executor", "local")]),
        1.0
    );
    for id in &ids {
        let id: TaskId = id.parse().unwrap();
        assert!(
            !text.contains(&id.to_string()) && !text.contains(&id.simple()),
            "task id {id} in the metrics"
        );
    }

    // The gauges follow the store at every scrape: a queue that empties disappears.
    let (status, _, cancelled) = api
        .call(
            Method::POST,
            &format!("/v1/tasks/{}/cancel", ids[2]),
            Some(&acme),
            None,
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    let text = scrape(&api).await;
    assert_eq!(value(&text, "agent_bus_tasks", &[("state", "queued")]), 3.0);
    assert_eq!(
        value(&text, "agent_bus_tasks", &[("state", "cancelled")]),
        1.0
    );
    assert_eq!(
        metric(&text, "agent_bus_queue_depth", &[("queue", "gpu")]),
        None,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "agent_bus_queue_oldest_age_seconds",
            &[("queue", "gpu")]
        ),
        None
    );
    assert_eq!(
        value(
            &text,
            "agent_bus_tasks_finished_total",
            &[
                ("queue", "gpu"),
                ("outcome", "cancelled"),
                ("reason", "cancelled_by_user")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            requests,
            &[
                ("method", "POST"),
                ("route", "/v1/tasks/{id}/cancel"),
                ("status", "200")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            requests,
            &[("method", "GET"), ("route", "/metrics"), ("status", "200")]
        ),
        1.0,
        "the first scrape was counted"
    );
}

async fn transitions_count_launches_outcomes_stages_and_settle_the_cost(db: Db) {
    let api = api_on(db.store.clone(), |_| {}).await;
    let acme = api.tenant("acme", 10).await;
    let mut body = gpu_body("train", "gpu", 2, "a100");
    body["resources"]["cpu"] = json!("1");
    body["resources"]["memory"] = json!("2Gi");
    body["timeout_seconds"] = json!(7200);
    let created = submit_ok(&api, &acme, &body).await;
    // 2 A100 at $3.67/h, 1 core at $0.04/h, 2 GiB at $0.005/h.
    let per_hour = 2.0 * 3.67 + 0.04 + 2.0 * 0.005;
    assert_close(
        f(&created["cost_estimate"]["per_hour_dollars"]),
        per_hour,
        1e-9,
        "estimate per hour",
    );
    assert_close(
        f(&created["cost_estimate"]["max_dollars"]),
        2.0 * per_hour,
        1e-9,
        "estimate for the 2 h timeout",
    );
    let id = id_of(&created);
    let stage = "agent_bus_task_stage_duration_seconds";

    walk(&api, &id, &LAUNCH).await;
    let text = scrape(&api).await;
    assert_eq!(
        value(
            &text,
            "agent_bus_tasks_launched_total",
            &[("queue", "gpu"), ("gpu_class", "a100")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            &format!("{stage}_count"),
            &[("stage", "queued_to_launched"), ("queue", "gpu")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            &format!("{stage}_count"),
            &[("stage", "launched_to_running")]
        ),
        None
    );
    assert_eq!(
        value(&text, "agent_bus_tasks", &[("state", "launched")]),
        1.0
    );
    assert_eq!(
        value(&text, "agent_bus_gpus_allocated", &[("gpu_class", "a100")]),
        2.0
    );
    let launched = read(&api, &acme, &id).await;
    assert!(launched["launched_at"].is_string(), "{launched}");
    assert!(launched["started_at"].is_null(), "{launched}");
    assert_eq!(launched["cost"]["total_dollars"], 0.0, "not running yet");

    // The pod waited 100 s for its image, then the command ran for an hour.
    db.execute(
        "UPDATE tasks SET launched_at = $1 WHERE id = $2",
        ago(3700),
        &id,
    )
    .await;
    walk(&api, &id, &[(TaskState::Launched, TaskState::Running)]).await;
    db.started_ago(&id, 3600).await;
    let (status, receipt) = report(
        &api,
        &id,
        &json!([{"sequence": 1, "sent_at": "2026-11-30T00:00:00Z", "kind": "heartbeat",
            "uptime_seconds": 3600.0, "gpus": [
                {"index": 0, "utilization_percent": 50.0, "memory_used_bytes": 1000},
                {"index": 1, "utilization_percent": 70.0, "memory_used_bytes": 3000}]}]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{receipt}");

    let running = read(&api, &acme, &id).await;
    assert_eq!(running["state"], "running");
    assert_eq!(running["cost"]["settled"], false);
    assert!(running["finished_at"].is_null());
    let seconds = f(&running["cost"]["running_seconds"]);
    assert!((3600.0..3700.0).contains(&seconds), "{running}");
    assert_close(
        f(&running["cost"]["compute"]["gpu"]),
        2.0 * 3.67 * seconds / 3600.0,
        1e-3,
        "GPU cost while running",
    );
    assert_close(
        f(&running["cost"]["per_hour_dollars"]),
        per_hour,
        1e-9,
        "per hour",
    );

    let text = scrape(&api).await;
    assert_eq!(
        value(
            &text,
            &format!("{stage}_count"),
            &[("stage", "launched_to_running"), ("queue", "gpu")]
        ),
        1.0
    );
    let waited = value(
        &text,
        &format!("{stage}_sum"),
        &[("stage", "launched_to_running"), ("queue", "gpu")],
    );
    assert!(
        (3700.0..3800.0).contains(&waited),
        "launched to running: {waited}"
    );
    assert_eq!(
        value(&text, "agent_bus_tasks", &[("state", "running")]),
        1.0
    );
    assert_eq!(
        value(&text, "agent_bus_gpus_reporting", &[("gpu_class", "a100")]),
        2.0
    );
    assert_close(
        value(
            &text,
            "agent_bus_gpu_utilization_ratio",
            &[("gpu_class", "a100")],
        ),
        0.6,
        1e-9,
        "mean utilisation",
    );
    assert_eq!(
        value(
            &text,
            "agent_bus_gpu_memory_used_bytes",
            &[("gpu_class", "a100")]
        ),
        4000.0
    );
    assert_close(
        value(
            &text,
            "agent_bus_cost_rate_dollars_per_hour",
            &[("tenant", "acme"), ("queue", "gpu")],
        ),
        per_hour,
        1e-9,
        "cost rate of the running task",
    );
    assert_eq!(
        metric(
            &text,
            "agent_bus_cost_dollars_total",
            &[("resource", "gpu")]
        ),
        None,
        "compute is counted when the task ends"
    );

    finish(&api, &id, TaskState::Succeeded).await;
    let text = scrape(&api).await;
    assert_eq!(
        value(
            &text,
            "agent_bus_tasks_finished_total",
            &[
                ("queue", "gpu"),
                ("outcome", "succeeded"),
                ("reason", "none")
            ]
        ),
        1.0
    );
    let run = [("stage", "running_to_finished"), ("queue", "gpu")];
    assert_eq!(value(&text, &format!("{stage}_count"), &run), 1.0);
    let ran = value(&text, &format!("{stage}_sum"), &run);
    assert!(
        (3600.0..3700.0).contains(&ran),
        "running to finished: {ran}"
    );
    assert_eq!(bucket(&text, stage, &run, 1800.0), 0.0);
    assert_eq!(bucket(&text, stage, &run, 7200.0), 1.0);
    assert_eq!(bucket(&text, stage, &run, f64::INFINITY), 1.0);
    let cost = |resource: &str| {
        value(
            &text,
            "agent_bus_cost_dollars_total",
            &[("tenant", "acme"), ("queue", "gpu"), ("resource", resource)],
        )
    };
    assert_close(cost("gpu"), 2.0 * 3.67 * ran / 3600.0, 1e-3, "GPU dollars");
    assert_close(cost("cpu"), 0.04 * ran / 3600.0, 1e-4, "CPU dollars");
    assert_close(cost("memory"), 0.01 * ran / 3600.0, 1e-4, "memory dollars");
    assert_eq!(
        value(&text, "agent_bus_tasks", &[("state", "succeeded")]),
        1.0
    );
    assert_eq!(
        metric(&text, "agent_bus_gpus_allocated", &[("gpu_class", "a100")]),
        None,
        "a finished task holds no GPU"
    );
    assert_eq!(
        metric(
            &text,
            "agent_bus_cost_rate_dollars_per_hour",
            &[("tenant", "acme")]
        ),
        None
    );

    let done = read(&api, &acme, &id).await;
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["cost"]["settled"], true, "{done}");
    let (launched_at, started_at, finished_at) = (
        timestamp(&done, "launched_at"),
        timestamp(&done, "started_at"),
        timestamp(&done, "finished_at"),
    );
    assert!(
        launched_at < started_at && started_at < finished_at,
        "{done}"
    );
    let seconds = f(&done["cost"]["running_seconds"]);
    assert_close(
        seconds,
        (finished_at.as_millisecond() - started_at.as_millisecond()) as f64 / 1000.0,
        1e-9,
        "running seconds are finished_at - started_at",
    );
    let compute = &done["cost"]["compute"];
    for (resource, hourly) in [("gpu", 2.0 * 3.67), ("cpu", 0.04), ("memory", 0.01)] {
        assert_close(
            f(&compute[resource]),
            hourly * seconds / 3600.0,
            2e-4,
            &format!("settled {resource} cost"),
        );
        assert_close(
            f(&compute[resource]),
            cost(resource),
            2e-4,
            &format!("{resource}: the task and the counter agree"),
        );
    }
    assert_close(
        f(&done["cost"]["total_dollars"]),
        f(&compute["gpu"]) + f(&compute["cpu"]) + f(&compute["memory"]),
        2e-4,
        "total",
    );
    assert_eq!(done["cost"]["llm_dollars"], 0.0);

    // A task cancelled while queued ran for nothing and costs nothing.
    let idle = id_of(&submit_ok(&api, &acme, &task_body("idle")).await);
    let (status, _, cancelled) = api
        .call(
            Method::POST,
            &format!("/v1/tasks/{idle}/cancel"),
            Some(&acme),
            None,
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cancelled["cost"]["settled"], true);
    assert_eq!(cancelled["cost"]["total_dollars"], 0.0);
    assert!(cancelled["finished_at"].is_string() && cancelled["started_at"].is_null());
    let text = scrape(&api).await;
    assert_eq!(
        value(
            &text,
            "agent_bus_tasks_finished_total",
            &[
                ("queue", "default"),
                ("outcome", "cancelled"),
                ("reason", "cancelled_by_user")
            ]
        ),
        1.0
    );
    assert_eq!(
        matching(&text, &format!("{stage}_count"), &[("queue", "default")])
            .iter()
            .map(|s| s.labels["stage"].clone())
            .collect::<Vec<_>>(),
        Vec::<String>::new(),
        "a task that never launched has no stage durations"
    );
    assert!(
        matching(
            &text,
            "agent_bus_cost_dollars_total",
            &[("queue", "default")]
        )
        .is_empty()
    );
}
