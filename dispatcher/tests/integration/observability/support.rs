//! Helpers of the observability cases: reading the metrics text, moving tasks through
//! their states, runner reports, and back-dating a task's timestamps with plain SQL.

use std::collections::BTreeMap;

use crate::common::{Db, TestApi, move_between};
use axum::http::{Method, StatusCode};

use dispatcher::task::{TaskId, TaskState};
use serde_json::{Value, json};
use sqlx::Connection as _;

impl Db {
    /// Runs `sql` with `$1` = `millis` and `$2` = the task id, on a connection of its own.
    pub(crate) async fn execute(&self, sql: &'static str, millis: i64, id: &str) {
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

    /// Pretends ended task `id` ran and finished a day earlier than it did: its times,
    /// and its cost in the tenant's daily spend the store keeps with each finish.
    pub(crate) async fn finished_a_day_earlier(&self, id: &str) {
        const DAY: i64 = 86_400_000;
        let mut connection = sqlx::AnyConnection::connect(&self.url).await.unwrap();
        let (tenant, finished_at, cost): (String, i64, f64) = sqlx::query_as(
            "SELECT tenant, finished_at, COALESCE(gpu_cost_dollars, 0) \
             + COALESCE(cpu_cost_dollars, 0) + COALESCE(memory_cost_dollars, 0) \
             + llm_cost_dollars FROM tasks WHERE id = $1",
        )
        .bind(id.to_owned())
        .fetch_one(&mut connection)
        .await
        .unwrap();
        let day = finished_at.div_euclid(DAY);
        for (statement, day, dollars) in [
            (
                "UPDATE tenant_daily_spend SET dollars = dollars - $3 WHERE tenant = $1 AND day = $2",
                day,
                cost,
            ),
            (
                "INSERT INTO tenant_daily_spend (tenant, day, dollars) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant, day) DO UPDATE SET dollars = tenant_daily_spend.dollars + excluded.dollars",
                day - 1,
                cost,
            ),
        ] {
            sqlx::query(statement)
                .bind(tenant.clone())
                .bind(day)
                .bind(dollars)
                .execute(&mut connection)
                .await
                .unwrap();
        }
        connection.close().await.unwrap();
        self.execute(
            "UPDATE tasks SET started_at = started_at - $1, finished_at = finished_at - $1 \
             WHERE id = $2",
            DAY,
            id,
        )
        .await;
    }

    /// Pretends task `id` has been running for `seconds`.
    pub(crate) async fn started_ago(&self, id: &str, seconds: i64) {
        self.execute(
            "UPDATE tasks SET started_at = $1 WHERE id = $2",
            ago(seconds),
            id,
        )
        .await;
    }
}

/// Unix milliseconds `seconds` ago.
pub(crate) fn ago(seconds: i64) -> i64 {
    (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(seconds)).as_millisecond()
}

// ---------------------------------------------------------------------------------------
// Reading the metrics text
// ---------------------------------------------------------------------------------------

/// One sample line of the OpenMetrics text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: f64,
}

/// Every sample of `text` (comments skipped). Label values may hold `{`, `}` and `,`
/// (route templates do), so they are read as quoted strings.
pub(crate) fn samples(text: &str) -> Vec<Sample> {
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
pub(crate) fn matching(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<Sample> {
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
pub(crate) fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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
pub(crate) fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
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
pub(crate) fn bucket(text: &str, name: &str, labels: &[(&str, &str)], le: f64) -> f64 {
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
pub(crate) fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: {actual} is not {expected} (± {tolerance})"
    );
}

/// `GET /metrics` on the metrics listener, which needs no key; checks the status and the
/// content type.
pub(crate) async fn scrape(api: &TestApi) -> String {
    let metrics_listener = TestApi {
        router: api.metrics_router.clone(),
        ..api.clone()
    };
    let (status, headers, body) = metrics_listener
        .call(Method::GET, "/metrics", None, None, &[])
        .await;
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

pub(crate) fn id_of(view: &Value) -> String {
    view["id"].as_str().unwrap().to_owned()
}

pub(crate) async fn submit_ok(api: &TestApi, key: &str, body: &Value) -> Value {
    let (status, created) = api.submit(key, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

pub(crate) async fn read(api: &TestApi, key: &str, id: &str) -> Value {
    let (status, view) = api.get(key, &format!("/v1/tasks/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view
}

/// A submission of `count` GPUs of `class` on `queue`.
pub(crate) fn gpu_body(name: &str, queue: &str, count: u32, class: &str) -> Value {
    json!({"name": name, "image": "busybox:1.36", "command": ["true"], "queue": queue,
           "resources": {"gpu": {"count": count, "class": class}}})
}

/// Moves task `id` through `moves`, as the launcher and watcher would.
pub(crate) async fn walk(api: &TestApi, id: &str, moves: &[(TaskState, TaskState)]) {
    let id: TaskId = id.parse().unwrap();
    for (from, to) in moves {
        let changed = api
            .lifecycle()
            .apply(id, *from, move_between(*from, *to))
            .await
            .unwrap();
        assert!(
            changed.is_some(),
            "task {id} did not move from {from} to {to}"
        );
    }
}

pub(crate) const LAUNCH: [(TaskState, TaskState); 2] = [
    (TaskState::Queued, TaskState::Launching),
    (TaskState::Launching, TaskState::Launched),
];

pub(crate) async fn finish(api: &TestApi, id: &str, outcome: TaskState) {
    walk(api, id, &[(TaskState::Running, outcome)]).await;
}

pub(crate) fn token_for(id: &str, attempt: u32) -> String {
    let tokens = dispatcher::report::ReportTokens::new(crate::common::TEST_REPORT_KEY);
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    tokens.mint(id.parse().unwrap(), attempt, expires)
}

/// Posts `reports` as attempt 1 of task `id`'s runner; returns the status and receipt.
pub(crate) async fn report(api: &TestApi, id: &str, reports: &Value) -> (StatusCode, Value) {
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

pub(crate) fn usage(
    sequence: u64,
    model: &str,
    calls: u64,
    tokens: (u64, u64),
    cost: f64,
) -> Value {
    json!({"sequence": sequence, "sent_at": "2026-11-30T00:00:00Z", "kind": "usage",
           "model": model, "calls": calls, "input_tokens": tokens.0,
           "output_tokens": tokens.1, "cost_usd": cost})
}

/// A task of `body` that ran for `seconds` (and, with `outcome`, ended so); `llm` dollars
/// of LLM usage reported on the way. Returns its id.
pub(crate) async fn task_that_ran(
    api: &TestApi,
    db: &Db,
    key: &str,
    body: &Value,
    seconds: i64,
    llm: f64,
    outcome: Option<TaskState>,
) -> String {
    let id = id_of(&submit_ok(api, key, body).await);
    walk(api, &id, &LAUNCH).await;
    if llm > 0.0 {
        let (status, receipt) =
            report(api, &id, &json!([usage(1, "gpt-4o", 1, (100, 10), llm)])).await;
        assert_eq!(status, StatusCode::OK, "{receipt}");
    }
    walk(api, &id, &[(TaskState::Launched, TaskState::Running)]).await;
    db.started_ago(&id, seconds).await;
    if let Some(outcome) = outcome {
        finish(api, &id, outcome).await;
    }
    id
}

pub(crate) fn timestamp(view: &Value, field: &str) -> jiff::Timestamp {
    view[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing: {view}"))
        .parse()
        .unwrap()
}

pub(crate) fn f(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

/// `GET /v1/usage` with `query` as `key`, expecting 200.
pub(crate) async fn usage_of(api: &TestApi, key: &str, query: &str) -> Value {
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
