//! `GET /v1/usage`: finished spend grouped by queue and day, bad ranges refused, tenants
//! kept apart.

use std::collections::BTreeMap;

use crate::common::{Db, api_on, on_both_stores, task_body};
use axum::http::{Method, StatusCode};
use dispatcher::task::TaskState;
use serde_json::{Value, json};

use super::support::*;

on_both_stores!(
    usage_groups_finished_spend_by_queue_and_day,
    usage_rejects_bad_ranges_and_keeps_tenants_apart,
);

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

/// What a GPU task that names no CPU or memory pays for them per hour: its class's
/// defaults (4 cores at $0.04, 8 GiB at $0.005), as its pod requests them.
const CLASS_DEFAULTS_HOUR: f64 = 4.0 * 0.04 + 8.0 * 0.005;

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
    db.finished_a_day_earlier(&c).await;
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
    assert_close(
        total("a"),
        3.67 + CLASS_DEFAULTS_HOUR,
        0.01,
        "an A100 hour with its class's CPU and memory",
    );
    assert_close(
        total("b"),
        2.0 * 0.04 / 2.0 + 0.5,
        0.01,
        "two cores for 30 min and LLM",
    );
    assert_close(
        total("c"),
        2.0 * (2.48 + CLASS_DEFAULTS_HOUR),
        0.01,
        "two V100 hours",
    );
    assert_eq!(read_views["d"]["cost"]["settled"], false);
    assert_close(
        total("d"),
        (2.48 + CLASS_DEFAULTS_HOUR) / 6.0,
        0.01,
        "ten V100 minutes so far",
    );
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
        0.5 * (9.80 + CLASS_DEFAULTS_HOUR),
        0.01,
        "half an hour of an H100 ($9.80/h) with its class's CPU and memory",
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
    // Each bound is checked alone: an empty range has no usage, and a range longer than
    // 400 days is shortened to its last 400 (the answer says what it summed).
    for (query, from, to) in [
        (
            "?from=2026-11-02&to=2026-11-01",
            "2026-11-02T00:00:00Z",
            "2026-11-02T00:00:00Z",
        ),
        (
            "?from=2026-11-01&to=2026-11-01",
            "2026-11-01T00:00:00Z",
            "2026-11-01T00:00:00Z",
        ),
        (
            "?from=2020-01-01&to=2026-01-01",
            "2024-11-27T00:00:00Z",
            "2026-01-01T00:00:00Z",
        ),
    ] {
        let (status, body) = api.get(&acme, &format!("/v1/usage{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        assert_eq!(
            (body["from"].as_str(), body["to"].as_str()),
            (Some(from), Some(to)),
            "{query}: {body}"
        );
    }
    let (_, empty) = api
        .get(
            &acme,
            "/v1/usage?from=2026-11-02&to=2026-11-01&group_by=day",
        )
        .await;
    assert_eq!(empty["groups"], serde_json::json!([]), "{empty}");
    for key in [None, Some("ab_not-a-key")] {
        let (status, _, body) = api.call(Method::GET, "/v1/usage", key, None, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
}
