//! Metrics, cost, usage and budgets through the API: `GET /metrics` after real traffic and
//! real transitions, the cost a task shows as it runs and once it is settled, LLM usage
//! reported by runners (counted once however often it is resent), `GET /v1/usage`, tenant
//! budgets that alert or refuse (402), and the `dispatcher tenant` budget flags. Each case
//! runs on a fresh PostgreSQL database and on an SQLite file.
//!
//! A test cannot wait an hour for a task to run, so where a figure needs running time the
//! test moves the task's stage timestamps back with plain SQL (a connection of its own to
//! the same database) before the store settles the cost.
// Metric values are compared exactly where they are counts (whole numbers, exact in f64);
// money and durations go through `assert_close`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::float_cmp
)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::{Db, TestApi, api_on, on_both_stores, sqlite_db, task_body};
use dispatcher::store::{Budget, BudgetAction, Store, Transition};
use dispatcher::task::{TaskId, TaskState};
use serde_json::{Value, json};
use sqlx::Connection as _;

on_both_stores!(
    metrics_count_requests_by_route_template_and_read_state_from_the_store,
    transitions_count_launches_outcomes_stages_and_settle_the_cost,
    llm_usage_is_counted_once_into_metrics_and_the_task_cost,
    usage_groups_finished_spend_by_queue_and_day,
    usage_rejects_bad_ranges_and_keeps_tenants_apart,
    spent_budgets_refuse_or_alert,
);

impl Db {
    /// Runs `sql` with `$1` = `millis` and `$2` = the task id, on a connection of its own.
    async fn execute(&self, sql: &'static str, millis: i64, id: &str) {
        let mut connection = sqlx::AnyConnection::connect(&self.url).await.unwrap();
        let updated = sqlx::query(sql)
            .bind(millis)
            .bind(id.to_owned())
            .execute(&mut connection)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(updated, 1, "{sql} on task {id}");
        connection.close().await.unwrap();
    }

    /// Pretends task `id` has been running for `seconds`.
    async fn started_ago(&self, id: &str, seconds: i64) {
        self.execute(
            "UPDATE tasks SET started_at = $1 WHERE id = $2",
            ago(seconds),
            id,
        )
        .await;
    }
}

/// Unix milliseconds `seconds` ago.
fn ago(seconds: i64) -> i64 {
    (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(seconds)).as_millisecond()
}

// ---------------------------------------------------------------------------------------
// Reading the metrics text
// ---------------------------------------------------------------------------------------

/// One sample line of the OpenMetrics text.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Every sample of `text` (comments skipped). Label values may hold `{`, `}` and `,`
/// (route templates do), so they are read as quoted strings.
fn samples(text: &str) -> Vec<Sample> {
    let mut found = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let mut key = String::new();
            let mut end = None;
            while let Some((index, c)) = chars.next() {
                match c {
                    '}' => {
                        end = Some(index + 1);
                        break;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                        let mut value = String::new();
                        loop {
                            match chars.next() {
                                Some((_, '\\')) => {
                                    if let Some((_, escaped)) = chars.next() {
                                        value.push(match escaped {
                                            'n' => '\n',
                                            other => other,
                                        });
                                    }
                                }
                                Some((_, '"')) => break,
                                Some((_, other)) => value.push(other),
                                None => panic!("unterminated label value: {line}"),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            }
            let end = end.unwrap_or_else(|| panic!("unterminated labels: {line}"));
            rest = &inner[end..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            number => number
                .parse()
                .unwrap_or_else(|e| panic!("value of {line}: {e}")),
        };
        found.push(Sample {
            name,
            labels,
            value,
        });
    }
    found
}

/// The samples of `name` that carry every label of `labels`.
fn matching(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<Sample> {
    samples(text)
        .into_iter()
        .filter(|sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(value))
        })
        .collect()
}

/// The one sample of `name` with `labels`, if there is one (more than one is a test bug).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found = matching(text, name, labels);
    assert!(
        found.len() <= 1,
        "{name} {labels:?} names {} samples: {found:?}",
        found.len()
    );
    found.first().map(|sample| sample.value)
}

/// As [`metric`], but the sample must exist.
#[track_caller]
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or_else(|| {
        let family: Vec<String> = text
            .lines()
            .filter(|line| line.starts_with(name))
            .map(str::to_owned)
            .collect();
        panic!("no sample {name} {labels:?}; the family has: {family:#?}")
    })
}

/// The histogram bucket of `name` with upper bound `le`.
#[track_caller]
fn bucket(text: &str, name: &str, labels: &[(&str, &str)], le: f64) -> f64 {
    let found: Vec<Sample> = matching(text, &format!("{name}_bucket"), labels)
        .into_iter()
        .filter(|sample| {
            sample
                .labels
                .get("le")
                .and_then(|bound| bound.parse::<f64>().ok())
                == Some(le)
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?} le={le}: {found:?}");
    found[0].value
}

#[track_caller]
fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: {actual} is not {expected} (± {tolerance})"
    );
}

/// `GET /metrics`, which needs no key; checks the status and the content type.
async fn scrape(api: &TestApi) -> String {
    let (status, headers, body) = api.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let content_type = headers
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = body.as_str().unwrap().to_owned();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    text
}

// ---------------------------------------------------------------------------------------
// Tasks, runners and their reports
// ---------------------------------------------------------------------------------------

fn id_of(view: &Value) -> String {
    view["id"].as_str().unwrap().to_owned()
}

async fn submit_ok(api: &TestApi, key: &str, body: &Value) -> Value {
    let (status, created) = api.submit(key, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

async fn read(api: &TestApi, key: &str, id: &str) -> Value {
    let (status, view) = api.get(key, &format!("/v1/tasks/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view
}

/// A submission of `count` GPUs of `class` on `queue`.
fn gpu_body(name: &str, queue: &str, count: u32, class: &str) -> Value {
    json!({"name": name, "image": "busybox:1.36", "command": ["true"], "queue": queue,
           "resources": {"gpu": {"count": count, "class": class}}})
}

/// Moves task `id` through `moves`, as the launcher and watcher would.
async fn walk(store: &Store, id: &str, moves: &[(TaskState, TaskState)]) {
    let id: TaskId = id.parse().unwrap();
    for (from, to) in moves {
        let changed = store
            .transition(id, *from, &Transition::to(*to))
            .await
            .unwrap();
        assert!(
            changed.is_some(),
            "task {id} did not move from {from} to {to}"
        );
    }
}

const LAUNCH: [(TaskState, TaskState); 2] = [
    (TaskState::Queued, TaskState::Launching),
    (TaskState::Launching, TaskState::Launched),
];

async fn finish(store: &Store, id: &str, outcome: TaskState) {
    walk(store, id, &[(TaskState::Running, outcome)]).await;
}

fn token_for(id: &str, attempt: u32) -> String {
    let tokens = dispatcher::report::ReportTokens::new(common::TEST_REPORT_KEY);
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    tokens.mint(id.parse().unwrap(), attempt, expires)
}

/// Posts `reports` as attempt 1 of task `id`'s runner; returns the status and receipt.
async fn report(api: &TestApi, id: &str, reports: &Value) -> (StatusCode, Value) {
    let (status, _, receipt) = api
        .call(
            Method::POST,
            &format!("/internal/v1/tasks/{id}/attempts/1/reports"),
            Some(&token_for(id, 1)),
            Some(&json!({ "reports": reports }).to_string()),
            &[],
        )
        .await;
    (status, receipt)
}

fn usage(sequence: u64, model: &str, calls: u64, tokens: (u64, u64), cost: f64) -> Value {
    json!({"sequence": sequence, "sent_at": "2026-11-30T00:00:00Z", "kind": "usage",
           "model": model, "calls": calls, "input_tokens": tokens.0,
           "output_tokens": tokens.1, "cost_usd": cost})
}

/// A task of `body` that ran for `seconds` (and, with `outcome`, ended so); `llm` dollars
/// of LLM usage reported on the way. Returns its id.
async fn task_that_ran(
    api: &TestApi,
    db: &Db,
    key: &str,
    body: &Value,
    seconds: i64,
    llm: f64,
    outcome: Option<TaskState>,
) -> String {
    let id = id_of(&submit_ok(api, key, body).await);
    walk(&db.store, &id, &LAUNCH).await;
    if llm > 0.0 {
        let (status, receipt) =
            report(api, &id, &json!([usage(1, "gpt-4o", 1, (100, 10), llm)])).await;
        assert_eq!(status, StatusCode::OK, "{receipt}");
    }
    walk(&db.store, &id, &[(TaskState::Launched, TaskState::Running)]).await;
    db.started_ago(&id, seconds).await;
    if let Some(outcome) = outcome {
        finish(&db.store, &id, outcome).await;
    }
    id
}

fn timestamp(view: &Value, field: &str) -> jiff::Timestamp {
    view[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing: {view}"))
        .parse()
        .unwrap()
}

fn f(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

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

    walk(&db.store, &id, &LAUNCH).await;
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
    walk(&db.store, &id, &[(TaskState::Launched, TaskState::Running)]).await;
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

    finish(&db.store, &id, TaskState::Succeeded).await;
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

async fn llm_usage_is_counted_once_into_metrics_and_the_task_cost(db: Db) {
    let api = api_on(db.store.clone(), |_| {}).await;
    let acme = api.tenant("acme", 10).await;
    let id = id_of(&submit_ok(&api, &acme, &task_body("agent")).await);
    walk(&db.store, &id, &LAUNCH).await;
    let batch = json!([
        {"sequence": 1, "sent_at": "2026-11-30T00:00:00Z", "kind": "started", "hostname": "h"},
        usage(2, "gpt-4o", 3, (1200, 300), 0.5),
        usage(3, "claude-sonnet-4", 1, (100, 50), 0.25),
    ]);
    let (status, receipt) = report(&api, &id, &batch).await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(receipt, json!({"accepted": 3, "duplicates": 0}));
    // The runner resends after a lost response.
    let (status, receipt) = report(&api, &id, &batch).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(receipt, json!({"accepted": 0, "duplicates": 3}));

    let view = read(&api, &acme, &id).await;
    assert_eq!(view["state"], "running", "started moves the task: {view}");
    assert_close(f(&view["cost"]["llm_dollars"]), 0.75, 1e-9, "LLM dollars");
    assert_close(
        f(&view["cost"]["total_dollars"]),
        0.75,
        1e-9,
        "a task without requests costs its LLM use only",
    );
    assert_eq!(view["cost"]["settled"], false);

    let text = scrape(&api).await;
    let tokens = |text: &str, model: &str, direction: &str| {
        value(
            text,
            "agent_bus_llm_tokens_total",
            &[
                ("tenant", "acme"),
                ("model", model),
                ("direction", direction),
            ],
        )
    };
    let calls = |text: &str, model: &str| {
        value(
            text,
            "agent_bus_llm_calls_total",
            &[("tenant", "acme"), ("model", model)],
        )
    };
    let llm_dollars = |text: &str| {
        value(
            text,
            "agent_bus_cost_dollars_total",
            &[
                ("tenant", "acme"),
                ("queue", "default"),
                ("resource", "llm"),
            ],
        )
    };
    assert_eq!(calls(&text, "gpt-4o"), 3.0);
    assert_eq!(calls(&text, "claude-sonnet-4"), 1.0);
    assert_eq!(tokens(&text, "gpt-4o", "input"), 1200.0);
    assert_eq!(tokens(&text, "gpt-4o", "output"), 300.0);
    assert_eq!(tokens(&text, "claude-sonnet-4", "input"), 100.0);
    assert_close(llm_dollars(&text), 0.75, 1e-9, "LLM dollars counted once");
    for (kind, count) in [("usage", 2.0), ("started", 1.0)] {
        assert_eq!(
            value(&text, "agent_bus_runner_reports_total", &[("kind", kind)]),
            count,
            "{kind}"
        );
    }

    // A later batch with one new report and one old one adds the new one only.
    let (status, receipt) = report(
        &api,
        &id,
        &json!([
            usage(3, "claude-sonnet-4", 1, (100, 50), 0.25),
            usage(4, "gpt-4o", 1, (10, 5), 0.1)
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(receipt, json!({"accepted": 1, "duplicates": 1}));
    // Reports that break a rule are refused whole and count nothing.
    for (bad, field) in [
        (usage(5, "gpt-4o", 1, (1, 1), -1.0), "reports[0].cost_usd"),
        (usage(5, "", 1, (1, 1), 1.0), "reports[0].model"),
    ] {
        let (status, body) = report(&api, &id, &json!([bad])).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["field"], field);
    }
    let text = scrape(&api).await;
    assert_eq!(calls(&text, "gpt-4o"), 4.0);
    assert_eq!(tokens(&text, "gpt-4o", "input"), 1210.0);
    assert_close(llm_dollars(&text), 0.85, 1e-9, "LLM dollars");

    finish(&db.store, &id, TaskState::Succeeded).await;
    let done = read(&api, &acme, &id).await;
    assert_eq!(done["cost"]["settled"], true);
    assert_close(f(&done["cost"]["llm_dollars"]), 0.85, 1e-9, "settled LLM");
    assert_close(
        f(&done["cost"]["total_dollars"]),
        0.85,
        1e-9,
        "settled total",
    );
    assert_close(
        f(&done["runner"]["usage_cost_usd"]),
        0.85,
        1e-9,
        "the runner view agrees",
    );
    let text = scrape(&api).await;
    assert_close(
        llm_dollars(&text),
        0.85,
        1e-9,
        "finishing adds no LLM cost again",
    );
    for resource in ["gpu", "cpu", "memory"] {
        assert_eq!(
            metric(
                &text,
                "agent_bus_cost_dollars_total",
                &[("resource", resource)]
            ),
            None,
            "nothing requested, nothing charged: {resource}"
        );
    }

    // The pod's termination summary counts more than arrived (the runner gave up on its
    // last reports): only the difference is added, once.
    let summary = protocol::TerminationSummary {
        v: 1,
        usage: vec![
            summary_usage("gpt-4o", 6, (2000, 400), 1.10),
            summary_usage("claude-sonnet-4", 1, (100, 50), 0.25),
            summary_usage("mistral-large", 1, (10, 10), 0.05),
        ],
        undelivered_reports: 2,
        ..protocol::TerminationSummary::default()
    };
    let task_id: TaskId = id.parse().unwrap();
    for _ in 0..2 {
        db.store
            .record_termination(task_id, 1, &summary)
            .await
            .unwrap();
    }
    let done = read(&api, &acme, &id).await;
    assert_close(
        f(&done["cost"]["llm_dollars"]),
        1.40,
        1e-9,
        "0.85 reported + 0.50 (gpt-4o) + 0.05 (mistral) unreported",
    );
    let text = scrape(&api).await;
    assert_close(
        llm_dollars(&text),
        1.40,
        1e-9,
        "the unreported LLM dollars, once",
    );
    assert_eq!(calls(&text, "gpt-4o"), 6.0);
    assert_eq!(tokens(&text, "gpt-4o", "input"), 2000.0);
    assert_eq!(calls(&text, "mistral-large"), 1.0);
    assert_eq!(
        calls(&text, "claude-sonnet-4"),
        1.0,
        "fully reported: unchanged"
    );
}

fn summary_usage(
    model: &str,
    calls: u64,
    (input, output): (u64, u64),
    cost: f64,
) -> protocol::Usage {
    protocol::Usage {
        model: model.to_owned(),
        calls,
        input_tokens: input,
        output_tokens: output,
        cost_usd: cost,
    }
}

/// `GET /v1/usage` with `query` as `key`, expecting 200.
async fn usage_of(api: &TestApi, key: &str, query: &str) -> Value {
    let (status, body) = api.get(key, &format!("/v1/usage{query}")).await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    let sum: f64 = body["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| f(&group["total_dollars"]))
        .sum();
    assert_close(
        f(&body["total_dollars"]),
        sum,
        1e-6,
        &format!("{query}: the total is the sum of the groups"),
    );
    for group in body["groups"].as_array().unwrap() {
        let parts = f(&group["compute"]["gpu"])
            + f(&group["compute"]["cpu"])
            + f(&group["compute"]["memory"])
            + f(&group["llm_dollars"]);
        assert_close(
            f(&group["total_dollars"]),
            parts,
            5e-4,
            &format!("{query}: a group's total is its parts: {group}"),
        );
    }
    body
}

/// `(key, tasks, total_dollars)` of each group.
fn groups(usage: &Value) -> Vec<(String, i64, f64)> {
    usage["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| {
            (
                group["key"].as_str().unwrap().to_owned(),
                group["tasks"].as_i64().unwrap(),
                f(&group["total_dollars"]),
            )
        })
        .collect()
}

#[track_caller]
fn assert_groups(actual: &[(String, i64, f64)], expected: &[(String, i64, f64)], what: &str) {
    assert_eq!(
        actual
            .iter()
            .map(|(key, tasks, _)| (key.clone(), *tasks))
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|(key, tasks, _)| (key.clone(), *tasks))
            .collect::<Vec<_>>(),
        "{what}"
    );
    for ((key, _, actual), (_, _, expected)) in actual.iter().zip(expected) {
        assert_close(*actual, *expected, 1e-3, &format!("{what}: group {key}"));
    }
}

fn day_of(at: jiff::Timestamp) -> String {
    at.strftime("%Y-%m-%d").to_string()
}

async fn usage_groups_finished_spend_by_queue_and_day(db: Db) {
    let api = api_on(db.store.clone(), |_| {}).await;
    let acme = api.tenant("acme", 100).await;
    let mut cpu_body = task_body("b");
    cpu_body["queue"] = json!("cpu");
    cpu_body["resources"] = json!({"cpu": "2"});
    // a: an A100 for an hour; b: two cores for half an hour and $0.50 of LLM calls;
    // c: a V100 for two hours, finished a day before a; d: a V100 running for 10 min.
    let a = task_that_ran(
        &api,
        &db,
        &acme,
        &gpu_body("a", "gpu", 1, "a100"),
        3600,
        0.0,
        Some(TaskState::Succeeded),
    )
    .await;
    let b = task_that_ran(
        &api,
        &db,
        &acme,
        &cpu_body,
        1800,
        0.5,
        Some(TaskState::Failed),
    )
    .await;
    let c = task_that_ran(
        &api,
        &db,
        &acme,
        &gpu_body("c", "gpu", 1, "v100"),
        7200,
        0.0,
        Some(TaskState::Succeeded),
    )
    .await;
    db.execute(
        "UPDATE tasks SET started_at = started_at - $1, finished_at = finished_at - $1 \
         WHERE id = $2",
        86_400_000,
        &c,
    )
    .await;
    let d = task_that_ran(
        &api,
        &db,
        &acme,
        &gpu_body("d", "gpu", 1, "v100"),
        600,
        0.0,
        None,
    )
    .await;
    submit_ok(&api, &acme, &gpu_body("e", "gpu", 1, "h100")).await;

    let mut read_views = BTreeMap::new();
    for (name, id) in [("a", &a), ("b", &b), ("c", &c), ("d", &d)] {
        read_views.insert(name, read(&api, &acme, id).await);
    }
    let total = |name: &str| f(&read_views[name]["cost"]["total_dollars"]);
    let finished_day = |name: &str| day_of(timestamp(&read_views[name], "finished_at"));
    assert_close(total("a"), 3.67, 0.01, "an A100 hour");
    assert_close(
        total("b"),
        2.0 * 0.04 / 2.0 + 0.5,
        0.01,
        "two cores for 30 min and LLM",
    );
    assert_close(total("c"), 2.0 * 2.48, 0.01, "two V100 hours");
    assert_eq!(read_views["d"]["cost"]["settled"], false);
    assert_close(total("d"), 2.48 / 6.0, 0.01, "ten V100 minutes so far");
    let a_day = finished_day("a");
    let c_day = finished_day("c");
    assert_ne!(a_day, c_day, "c finished the day before a");

    // Three days back to now, by queue: c counts, d (running) and e (queued) do not.
    let now = jiff::Timestamp::now();
    let from = day_of(now - jiff::SignedDuration::from_hours(72));
    let by_queue = usage_of(&api, &acme, &format!("?from={from}&group_by=queue")).await;
    assert_eq!(by_queue["tenant"], "acme");
    assert_eq!(by_queue["group_by"], "queue");
    assert_eq!(by_queue["from"], format!("{from}T00:00:00Z"));
    assert_groups(
        &groups(&by_queue),
        &[
            ("cpu".to_owned(), 1, total("b")),
            ("gpu".to_owned(), 2, total("a") + total("c")),
        ],
        "by queue",
    );
    let cpu_group = &by_queue["groups"][0];
    assert_close(f(&cpu_group["llm_dollars"]), 0.5, 1e-9, "cpu group LLM");
    assert_close(
        f(&cpu_group["compute"]["cpu"]),
        f(&read_views["b"]["cost"]["compute"]["cpu"]),
        1e-4,
        "cpu group CPU",
    );
    let gpu_group = &by_queue["groups"][1];
    assert_close(
        f(&gpu_group["compute"]["gpu"]),
        f(&read_views["a"]["cost"]["compute"]["gpu"])
            + f(&read_views["c"]["cost"]["compute"]["gpu"]),
        2e-4,
        "gpu group GPU",
    );
    assert_close(
        f(&by_queue["unfinished_dollars"]),
        total("d"),
        0.005,
        "the running task is reported apart",
    );

    // The same range by day.
    let by_day = usage_of(&api, &acme, &format!("?from={from}&group_by=day")).await;
    assert_eq!(by_day["group_by"], "day");
    let mut expected: BTreeMap<String, (i64, f64)> = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let entry = expected.entry(finished_day(name)).or_default();
        entry.0 += 1;
        entry.1 += total(name);
    }
    let expected: Vec<(String, i64, f64)> = expected
        .into_iter()
        .map(|(day, (tasks, dollars))| (day, tasks, dollars))
        .collect();
    assert_groups(&groups(&by_day), &expected, "by day");
    assert_close(
        f(&by_day["total_dollars"]),
        f(&by_queue["total_dollars"]),
        1e-3,
        "both groupings add up to the same",
    );

    // `to` is exclusive: up to the start of a's day only c finished.
    let before_a = usage_of(&api, &acme, &format!("?from={from}&to={a_day}")).await;
    assert_groups(
        &groups(&before_a),
        &[("gpu".to_owned(), 1, total("c"))],
        "before a's day",
    );
    // `from` is inclusive, and takes RFC 3339 times.
    let a_finished = read_views["a"]["finished_at"].as_str().unwrap();
    let since_a = usage_of(&api, &acme, &format!("?from={a_finished}")).await;
    assert_groups(
        &groups(&since_a),
        &[
            ("cpu".to_owned(), 1, total("b")),
            ("gpu".to_owned(), 1, total("a")),
        ],
        "from a's end",
    );

    // The default range is the current UTC month up to now.
    let month_start = now
        .to_zoned(jiff::tz::TimeZone::UTC)
        .first_of_month()
        .unwrap()
        .start_of_day()
        .unwrap()
        .timestamp();
    let default = usage_of(&api, &acme, "").await;
    assert_eq!(default["group_by"], "queue");
    assert_eq!(
        default["from"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap(),
        month_start
    );
    let to: jiff::Timestamp = default["to"].as_str().unwrap().parse().unwrap();
    assert!(to >= now && to <= jiff::Timestamp::now(), "to is now: {to}");
    let in_month = |name: &str| timestamp(&read_views[name], "finished_at") >= month_start;
    let mut expected = Vec::new();
    if in_month("b") {
        expected.push(("cpu".to_owned(), 1, total("b")));
    }
    let gpu: Vec<&str> = ["a", "c"]
        .into_iter()
        .filter(|name| in_month(name))
        .collect();
    if !gpu.is_empty() {
        expected.push((
            "gpu".to_owned(),
            gpu.len() as i64,
            gpu.iter().map(|name| total(name)).sum(),
        ));
    }
    assert_groups(&groups(&default), &expected, "this month");

    // What the budgets are checked against: today's and this month's spend, the running
    // task included.
    let budget = &default["budget"];
    assert_eq!(budget["action"], "alert");
    assert!(budget["daily_dollars"].is_null() && budget["monthly_dollars"].is_null());
    let today = day_of(jiff::Timestamp::now());
    let spent_today: f64 = ["a", "b", "c"]
        .into_iter()
        .filter(|name| finished_day(name) == today)
        .map(total)
        .sum::<f64>()
        + total("d");
    assert_close(
        f(&budget["spent_today_dollars"]),
        spent_today,
        0.01,
        "spent today",
    );
    let spent_month: f64 = ["a", "b", "c"]
        .into_iter()
        .filter(|name| in_month(name))
        .map(total)
        .sum::<f64>()
        + total("d");
    assert_close(
        f(&budget["spent_this_month_dollars"]),
        spent_month,
        0.01,
        "spent this month",
    );
}

async fn usage_rejects_bad_ranges_and_keeps_tenants_apart(db: Db) {
    let api = api_on(db.store.clone(), |_| {}).await;
    let acme = api.tenant("acme", 10).await;
    let globex = api.tenant("globex", 10).await;
    let mine = task_that_ran(
        &api,
        &db,
        &acme,
        &gpu_body("mine", "gpu", 1, "a100"),
        3600,
        0.25,
        Some(TaskState::Succeeded),
    )
    .await;
    let theirs = task_that_ran(
        &api,
        &db,
        &globex,
        &gpu_body("theirs", "gpu", 2, "h100"),
        3600,
        1.0,
        Some(TaskState::Succeeded),
    )
    .await;
    task_that_ran(
        &api,
        &db,
        &globex,
        &gpu_body("still", "gpu", 1, "h100"),
        1800,
        0.0,
        None,
    )
    .await;
    let mine = read(&api, &acme, &mine).await;
    let theirs = read(&api, &globex, &theirs).await;
    let from = day_of(jiff::Timestamp::now() - jiff::SignedDuration::from_hours(48));
    let query = format!("?from={from}");

    let acme_usage = usage_of(&api, &acme, &query).await;
    assert_eq!(acme_usage["tenant"], "acme");
    assert_groups(
        &groups(&acme_usage),
        &[("gpu".to_owned(), 1, f(&mine["cost"]["total_dollars"]))],
        "acme sees its own task only",
    );
    assert_eq!(
        acme_usage["unfinished_dollars"], 0.0,
        "globex's running task is not acme's"
    );
    assert_close(
        f(&acme_usage["budget"]["spent_today_dollars"]),
        f(&mine["cost"]["total_dollars"]),
        0.01,
        "acme's spend today",
    );
    let globex_usage = usage_of(&api, &globex, &query).await;
    assert_eq!(globex_usage["tenant"], "globex");
    assert_groups(
        &groups(&globex_usage),
        &[("gpu".to_owned(), 1, f(&theirs["cost"]["total_dollars"]))],
        "globex sees its own task only",
    );
    assert_close(
        f(&globex_usage["unfinished_dollars"]),
        9.80 / 2.0,
        0.01,
        "half an hour of an H100 ($9.80/h)",
    );
    assert!(
        f(&globex_usage["total_dollars"]) > f(&acme_usage["total_dollars"]),
        "the figures differ, so they were not mixed up"
    );

    for (query, field) in [
        ("?from=last-week", "from"),
        ("?from=2026-13-01", "from"),
        ("?to=2026-02-30", "to"),
        ("?to=yesterday", "to"),
        ("?from=2026-11-02&to=2026-11-01", "to"),
        ("?from=2026-11-01&to=2026-11-01", "to"),
        ("?from=2026-11-02T00:00:00Z&to=2026-11-01T23:59:59Z", "to"),
        ("?from=2020-01-01&to=2026-01-01", "to"),
        ("?group_by=week", "group_by"),
        ("?group_by=tenant", "group_by"),
    ] {
        let (status, body) = api.get(&acme, &format!("/v1/usage{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_field", "{query}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
        assert!(
            !body["error"]["message"].as_str().unwrap().is_empty(),
            "{query}"
        );
    }
    for key in [None, Some("ab_not-a-key")] {
        let (status, _, body) = api.call(Method::GET, "/v1/usage", key, None, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
}

async fn spent_budgets_refuse_or_alert(db: Db) {
    let api = api_on(db.store.clone(), |_| {}).await;
    let acme = api.tenant("acme", 100).await;
    let globex = api.tenant("globex", 100).await;
    db.store
        .set_budget(
            "acme",
            &Budget {
                daily_dollars: Some(1.0),
                monthly_dollars: Some(100.0),
                action: BudgetAction::Refuse,
            },
        )
        .await
        .unwrap();
    // Under budget: accepted. The task's runner then reports $1.50 of LLM calls.
    let keyed = task_body("spender").to_string();
    let headers = [("idempotency-key", "spender-1")];
    let (status, _, spender) = api
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&acme),
            Some(&keyed),
            &headers,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{spender}");
    let spender = id_of(&spender);
    walk(&db.store, &spender, &LAUNCH).await;
    let (status, _) = report(
        &api,
        &spender,
        &json!([usage(1, "gpt-4o", 10, (1, 1), 1.5)]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let tomorrow = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .tomorrow()
        .unwrap()
        .start_of_day()
        .unwrap()
        .timestamp();
    for attempt in 1..=2 {
        let (status, body) = api.submit(&acme, &task_body("more")).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{attempt}: {body}");
        assert_eq!(body["error"]["code"], "budget_exceeded");
        let message = body["error"]["message"].as_str().unwrap();
        for part in [
            "acme",
            "daily budget",
            "$1.50",
            "$1.00",
            &format!("accepted again from {tomorrow}"),
        ] {
            assert!(message.contains(part), "{part:?} not in {message:?}");
        }
    }
    let (_, list) = api.get(&acme, "/v1/tasks").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "nothing refused was stored"
    );
    // A retry of the submission accepted before the budget was spent is still a replay:
    // the task exists, and the client must learn so rather than read a refusal.
    let (status, replay_headers, replayed) = api
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&acme),
            Some(&keyed),
            &headers,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["id"], spender);
    assert_eq!(replay_headers.get("idempotent-replayed").unwrap(), "true");
    // A dry run creates nothing, so it is not refused.
    let (status, _, dry) = api
        .call(
            Method::POST,
            "/v1/tasks?dry_run=true",
            Some(&acme),
            Some(&task_body("preview").to_string()),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    // Another tenant's budget is not acme's.
    submit_ok(&api, &globex, &task_body("unaffected")).await;

    let text = scrape(&api).await;
    assert_eq!(
        value(
            &text,
            "agent_bus_budget_refusals_total",
            &[("tenant", "acme"), ("period", "day")]
        ),
        2.0
    );
    for (period, budget) in [("day", 1.0), ("month", 100.0)] {
        let labels = [("tenant", "acme"), ("period", period)];
        assert_close(
            value(&text, "agent_bus_tenant_spend_dollars", &labels),
            1.5,
            1e-9,
            &format!("spend this {period}"),
        );
        assert_eq!(
            value(&text, "agent_bus_tenant_budget_dollars", &labels),
            budget
        );
    }
    assert!(
        matching(
            &text,
            "agent_bus_tenant_spend_dollars",
            &[("tenant", "globex")]
        )
        .is_empty(),
        "tenants without a budget have no budget gauges"
    );
    let usage = usage_of(&api, &acme, "").await;
    assert_eq!(
        usage["budget"],
        json!({"daily_dollars": 1.0, "monthly_dollars": 100.0, "action": "refuse",
               "spent_today_dollars": 1.5, "spent_this_month_dollars": 1.5})
    );
    assert_close(
        f(&usage["unfinished_dollars"]),
        1.5,
        1e-9,
        "the spender is still running",
    );

    // The monthly budget refuses too, and names itself.
    db.store
        .set_budget(
            "acme",
            &Budget {
                daily_dollars: None,
                monthly_dollars: Some(1.25),
                action: BudgetAction::Refuse,
            },
        )
        .await
        .unwrap();
    let (status, body) = api.submit(&acme, &task_body("more")).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("monthly budget of $1.25"), "{message}");

    // With action alert, a spent budget only shows.
    db.store
        .set_budget(
            "acme",
            &Budget {
                daily_dollars: Some(1.0),
                monthly_dollars: None,
                action: BudgetAction::Alert,
            },
        )
        .await
        .unwrap();
    submit_ok(&api, &acme, &task_body("alerted")).await;
    let text = scrape(&api).await;
    assert_eq!(
        value(
            &text,
            "agent_bus_budget_refusals_total",
            &[("tenant", "acme"), ("period", "day")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "agent_bus_budget_refusals_total",
            &[("tenant", "acme"), ("period", "month")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "agent_bus_tenant_budget_dollars",
            &[("tenant", "acme"), ("period", "day")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "agent_bus_tenant_budget_dollars",
            &[("tenant", "acme"), ("period", "month")]
        ),
        None,
        "no monthly budget, no gauge"
    );
    assert_close(
        value(
            &text,
            "agent_bus_tenant_spend_dollars",
            &[("tenant", "acme"), ("period", "month")],
        ),
        1.5,
        1e-9,
        "spend shows without a budget for the period",
    );

    // A zero budget with action refuse accepts nothing; clearing it accepts again.
    db.store
        .set_budget(
            "globex",
            &Budget {
                daily_dollars: Some(0.0),
                monthly_dollars: None,
                action: BudgetAction::Refuse,
            },
        )
        .await
        .unwrap();
    let (status, body) = api.submit(&globex, &task_body("zero")).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    db.store
        .set_budget("globex", &Budget::default())
        .await
        .unwrap();
    submit_ok(&api, &globex, &task_body("free")).await;
    let usage = usage_of(&api, &globex, "").await;
    assert_eq!(usage["budget"]["daily_dollars"], Value::Null);
    assert_eq!(usage["budget"]["action"], "alert");
    let text = scrape(&api).await;
    assert!(
        matching(
            &text,
            "agent_bus_tenant_budget_dollars",
            &[("tenant", "globex")]
        )
        .is_empty()
    );
}

/// `dispatcher ARGS` against the SQLite file at `url`.
async fn dispatcher(url: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(args)
        .env("AGENT_BUS_LOG", "warn")
        .env("DATABASE_URL", url)
        .env_remove("REDIS_URL")
        .env_remove("KUBECONFIG")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn tenant_commands_set_budgets_and_name_bad_flags() {
    let db = sqlite_db().await;
    let url = db.url.clone();
    let ok = |output: &std::process::Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let output = dispatcher(
        &url,
        &[
            "tenant",
            "create",
            "acme",
            "--daily-budget",
            "5",
            "--budget-action",
            "refuse",
        ],
    )
    .await;
    ok(&output);
    let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("ab_"), "{key}");
    let daily_refuse = Budget {
        daily_dollars: Some(5.0),
        monthly_dollars: None,
        action: BudgetAction::Refuse,
    };
    assert_eq!(
        db.store.budgets().await.unwrap(),
        vec![("acme".to_owned(), daily_refuse)]
    );
    // The key works and the API shows the budget.
    let api = api_on(db.store.clone(), |_| {}).await;
    let usage = usage_of(&api, &key, "").await;
    assert_eq!(usage["budget"]["daily_dollars"], 5.0);
    assert_eq!(usage["budget"]["action"], "refuse");

    // `tenant budget` sets the budgets the flags give: those not given are cleared and
    // the action is `alert` unless said otherwise.
    ok(&dispatcher(
        &url,
        &["tenant", "budget", "acme", "--monthly-budget", "100"],
    )
    .await);
    assert_eq!(
        db.store.budgets().await.unwrap(),
        vec![(
            "acme".to_owned(),
            Budget {
                daily_dollars: None,
                monthly_dollars: Some(100.0),
                action: BudgetAction::Alert,
            }
        )]
    );
    let usage = usage_of(&api, &key, "").await;
    assert_eq!(usage["budget"]["monthly_dollars"], 100.0);

    for (args, flag) in [
        (
            vec!["tenant", "create", "beta", "--daily-budget=-5"],
            "--daily-budget",
        ),
        (
            vec!["tenant", "create", "beta", "--daily-budget", "-5"],
            "--daily-budget",
        ),
        (
            vec!["tenant", "create", "beta", "--monthly-budget", "NaN"],
            "--monthly-budget",
        ),
        (
            vec!["tenant", "create", "beta", "--budget-action", "maybe"],
            "--budget-action",
        ),
        (
            vec!["tenant", "budget", "acme", "--monthly-budget=-1"],
            "--monthly-budget",
        ),
        (
            vec!["tenant", "budget", "acme", "--budget-action", "maybe"],
            "--budget-action",
        ),
    ] {
        let output = dispatcher(&url, &args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?} printed a key");
    }
    let output = dispatcher(&url, &["tenant", "budget", "ghost", "--daily-budget", "1"]).await;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("ghost"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Nothing refused was written: beta does not exist, acme's budget is unchanged.
    assert_eq!(
        db.store.budgets().await.unwrap()[0].1.monthly_dollars,
        Some(100.0)
    );
    ok(&dispatcher(&url, &["tenant", "create", "beta"]).await);
    assert_eq!(
        db.store.budgets().await.unwrap().len(),
        1,
        "beta has no budget"
    );
}
