//! Task output (docs/LOGS.md): the runner's `/logs` route and `GET /v1/tasks/{id}/logs`
//! on both stores (order, resends, `tail`/`since`/`attempt`/`timestamps`, the cap and its
//! marker, follow, the end allowance, another tenant, bad query values, retention), the
//! event stream's `include=progress,logs`, and the embedded default end to end (the
//! local executor through the real runner).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use dispatcher::store::Store;
use dispatcher::task::lifecycle::Move;
use dispatcher::task::{TaskId, TaskState};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::common::{TestApi, api_on, move_between, on_both_stores, task_body};

fn token_for(id: &str, attempt: u32) -> String {
    let tokens = dispatcher::report::ReportTokens::new(crate::common::TEST_REPORT_KEY);
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
    tokens.mint(id.parse().unwrap(), attempt, expires)
}

/// A submitted task moved to `running`, as the launcher and the runner would.
async fn running_task(api: &TestApi, key: &str, name: &str) -> String {
    let (status, task) = api.submit(key, &task_body(name)).await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let id = task["id"].as_str().unwrap().to_owned();
    let task_id: TaskId = id.parse().unwrap();
    let lifecycle = api.lifecycle();
    assert!(matches!(
        lifecycle.claim(task_id).await.unwrap(),
        dispatcher::lifecycle::Claim::Claimed(_)
    ));
    for (from, to) in [
        (TaskState::Launching, TaskState::Launched),
        (TaskState::Launched, TaskState::Running),
    ] {
        lifecycle
            .apply(task_id, from, move_between(from, to))
            .await
            .unwrap()
            .unwrap();
    }
    id
}

async fn end_task(api: &TestApi, id: &str) {
    let move_: Move = move_between(TaskState::Running, TaskState::Succeeded);
    api.lifecycle()
        .apply(id.parse().unwrap(), TaskState::Running, move_)
        .await
        .unwrap()
        .unwrap();
}

/// Lines as the runner sends them: (sequence, stream, text), at times one second apart
/// from 10:00:00.
fn batch(lines: &[(u64, &str, &str)]) -> String {
    let lines: Vec<Value> = lines
        .iter()
        .map(|(sequence, stream, line)| {
            json!({"sequence": sequence, "stream": stream,
                   "time": format!("2026-12-02T10:00:{:02}.250Z", sequence % 60), "line": line})
        })
        .collect();
    json!({ "lines": lines }).to_string()
}

async fn post_lines(api: &TestApi, id: &str, attempt: u32, body: &str) -> (StatusCode, Value) {
    let url = format!("/internal/v1/tasks/{id}/attempts/{attempt}/logs");
    let (status, _, value) = api
        .call(
            Method::POST,
            &url,
            Some(&token_for(id, attempt)),
            Some(body),
            &[],
        )
        .await;
    (status, value)
}

/// `GET uri` as text: (status, content type, body).
async fn get_text(api: &TestApi, key: &str, uri: &str) -> (StatusCode, String, String) {
    let request = Request::builder()
        .uri(uri)
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap();
    (
        status,
        content_type,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

async fn lines_are_kept_in_order_and_read_back_every_way(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let other_key = api.tenant("globex", 10).await;
    let id = running_task(&api, &key, "talkative").await;

    let (status, _, before) = get_text(&api, &key, &format!("/v1/tasks/{id}/logs")).await;
    assert_eq!(
        (status, before.as_str()),
        (StatusCode::OK, ""),
        "no line yet: an empty body"
    );

    let first = batch(&[
        (1, "stdout", "out 1"),
        (2, "stderr", "err 1"),
        (3, "stdout", "out 2"),
    ]);
    let (status, receipt) = post_lines(&api, &id, 1, &first).await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(
        receipt,
        json!({"accepted": 3, "duplicates": 0, "capped": false})
    );
    // A resent batch (a lost response) stores nothing twice.
    let (_, receipt) = post_lines(&api, &id, 1, &first).await;
    assert_eq!(
        receipt,
        json!({"accepted": 0, "duplicates": 3, "capped": false})
    );
    let (status, receipt) = post_lines(
        &api,
        &id,
        1,
        &batch(&[
            (4, "stderr", "err 2"),
            (5, "stdout", "ünïcode ✓"),
            (6, "stdout", ""),
        ]),
    )
    .await;
    assert_eq!(
        (status, receipt["accepted"].as_u64()),
        (StatusCode::OK, Some(3))
    );
    end_task(&api, &id).await;

    let logs = format!("/v1/tasks/{id}/logs");
    let (status, content_type, text) = get_text(&api, &key, &logs).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/plain; charset=utf-8");
    assert_eq!(text, "out 1\nerr 1\nout 2\nerr 2\nünïcode ✓\n\n");

    let (_, _, text) = get_text(&api, &key, &format!("{logs}?timestamps=true&tail=2")).await;
    assert_eq!(
        text,
        "2026-12-02T10:00:05.25Z stdout ünïcode ✓\n2026-12-02T10:00:06.25Z stdout \n"
    );
    let (_, _, text) = get_text(&api, &key, &format!("{logs}?tail=3")).await;
    assert_eq!(text, "err 2\nünïcode ✓\n\n");
    let (_, _, text) = get_text(
        &api,
        &key,
        &format!("{logs}?since=2026-12-02T10:00:03.250Z"),
    )
    .await;
    assert_eq!(text, "out 2\nerr 2\nünïcode ✓\n\n");
    let (_, _, text) = get_text(
        &api,
        &key,
        &format!("{logs}?since=2026-12-02T10:00:02Z&tail=1&attempt=1"),
    )
    .await;
    assert_eq!(text, "\n");
    let (_, _, text) = get_text(&api, &key, &format!("{logs}?follow=true")).await;
    assert_eq!(
        text, "out 1\nerr 1\nout 2\nerr 2\nünïcode ✓\n\n",
        "follow of an ended attempt sends everything and ends"
    );

    // Another tenant's task is a missing one.
    let (status, _, body) = get_text(&api, &other_key, &logs).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Bad values name their parameter.
    // An attempt that has not begun is a valid request the task's state refuses.
    let (status, body) = api.get(&key, &format!("{logs}?attempt=2")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        (&body["error"]["code"], &body["error"]["field"]),
        (&json!("attempt_not_started"), &json!("attempt"))
    );
    for (query, field) in [
        ("attempt=0", "attempt"),
        ("tail=0", "tail"),
        ("tail=10001", "tail"),
        ("since=yesterday", "since"),
        ("since=2026-12-02T10:00Z", "since"),
        ("timestamps=maybe", "timestamps"),
        ("timestamps=1", "timestamps"),
        ("follow=2", "follow"),
    ] {
        let (status, body) = api.get(&key, &format!("{logs}?{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }
    // The route checks its token: another attempt's is refused.
    let url = format!("/internal/v1/tasks/{id}/attempts/1/logs");
    let (status, _, _) = api
        .call(
            Method::POST,
            &url,
            Some(&token_for(&id, 2)),
            Some(&first),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = post_lines(&api, &id, 1, &batch(&[(0, "stdout", "x")])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "lines[0].sequence");
}

async fn the_cap_keeps_a_marker_and_stops_the_runner(store: Store) {
    // Reports have a tiny allowance: lines do not count against it.
    let api = api_on(store, |state| {
        state.reports.max_log_bytes = 20;
        state.reports.allowance.max_bytes = 1;
        state.reports.allowance.max_reports = 0;
    })
    .await;
    let key = api.tenant("acme", 10).await;
    let id = running_task(&api, &key, "noisy").await;
    let (status, receipt) = post_lines(
        &api,
        &id,
        1,
        &batch(&[
            (1, "stdout", "0123456789"),
            (2, "stdout", "abcdefghij"),
            (3, "stdout", "past the cap"),
            (4, "stderr", "also past"),
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(
        receipt,
        json!({"accepted": 2, "duplicates": 0, "capped": true})
    );
    let (_, receipt) = post_lines(&api, &id, 1, &batch(&[(5, "stdout", "later")])).await;
    assert_eq!(
        receipt,
        json!({"accepted": 0, "duplicates": 0, "capped": true})
    );
    let (_, _, text) = get_text(&api, &key, &format!("/v1/tasks/{id}/logs")).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(&lines[..2], ["0123456789", "abcdefghij"]);
    assert!(
        lines[2].contains("reached its cap of 20 bytes (--max-log-bytes-per-attempt)"),
        "{text}"
    );
    let (_, _, text) = get_text(
        &api,
        &key,
        &format!("/v1/tasks/{id}/logs?timestamps=true&tail=1"),
    )
    .await;
    assert!(
        text.contains(" stderr [agent-bus: "),
        "the marker is on stderr: {text}"
    );
}

async fn follow_sends_lines_as_they_come_and_ends_with_the_attempt(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let id = running_task(&api, &key, "followed").await;
    post_lines(&api, &id, 1, &batch(&[(1, "stdout", "early")])).await;

    let request = Request::builder()
        .uri(format!("/v1/tasks/{id}/logs?follow=true&timestamps=false"))
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let mut received = String::new();
    let mut read_until = async |want: &str, received: &mut String| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !received.ends_with(want) {
            match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(Some(chunk)) => received.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
                Ok(None) => panic!("the stream ended early: {received:?}"),
                Err(elapsed) => panic!("no {want:?} ({elapsed}): {received:?}"),
            }
        }
    };
    read_until("early\n", &mut received).await;
    post_lines(&api, &id, 1, &batch(&[(2, "stderr", "while running")])).await;
    read_until("while running\n", &mut received).await;
    // The runner's last lines come before its finished report, so before the end.
    post_lines(&api, &id, 1, &batch(&[(3, "stdout", "last")])).await;
    end_task(&api, &id).await;
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rest = String::new();
        while let Some(chunk) = body.next().await {
            rest.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
        rest
    })
    .await
    .expect("the stream ends once the attempt ended");
    received.push_str(&rest);
    assert_eq!(received, "early\nwhile running\nlast\n");
}

async fn the_end_allowance_refuses_late_lines_and_retention_purges(store: Store) {
    let api = api_on(store.clone(), |state| {
        state.reports.allowance.after_end = jiff::SignedDuration::ZERO;
    })
    .await;
    let key = api.tenant("acme", 10).await;
    let ended = running_task(&api, &key, "ended").await;
    let running = running_task(&api, &key, "running").await;
    for id in [&ended, &running] {
        let (status, _) = post_lines(&api, id, 1, &batch(&[(1, "stdout", "kept a while")])).await;
        assert_eq!(status, StatusCode::OK);
    }
    end_task(&api, &ended).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, body) = post_lines(&api, &ended, 1, &batch(&[(2, "stdout", "too late")])).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "attempt_over");

    // Nothing is older than a retention of an hour…
    let now = jiff::Timestamp::now();
    let hour_ago = now - jiff::SignedDuration::from_hours(1);
    assert_eq!(api.store.purge_logs(hour_ago, 100).await.unwrap(), 0);
    // …but with the cut-off in the future, the ended task's lines go, in bounded batches;
    // the running task's stay.
    let later = now + jiff::SignedDuration::from_mins(1);
    assert_eq!(api.store.purge_logs(later, 100).await.unwrap(), 1);
    assert_eq!(api.store.purge_logs(later, 100).await.unwrap(), 0);
    let (_, _, text) = get_text(&api, &key, &format!("/v1/tasks/{ended}/logs")).await;
    assert_eq!(text, "");
    let (_, _, text) = get_text(&api, &key, &format!("/v1/tasks/{running}/logs")).await;
    assert_eq!(text, "kept a while\n");
}

async fn the_event_stream_includes_progress_and_lines(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let id = running_task(&api, &key, "evented").await;
    let (status, body) = api
        .get(
            &key,
            &format!("/v1/tasks/{id}/events?follow=true&include=progress,stdout"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "include");
    // Only the values the document lists: no spaces, no empty or repeated items.
    for include in ["logs,%20progress", "logs,", "logs,logs", ""] {
        let (status, body) = api
            .get(&key, &format!("/v1/tasks/{id}/events?include={include}"))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{include}");
        assert_eq!(body["error"]["field"], "include");
    }

    post_lines(
        &api,
        &id,
        1,
        &batch(&[(1, "stdout", "hello"), (2, "stderr", "warn")]),
    )
    .await;
    let reports = json!({"reports": [
        {"sequence": 10, "sent_at": "2026-12-02T10:00:01Z", "kind": "progress", "percent": 42.0, "message": "epoch 2/5"}
    ]})
    .to_string();
    let url = format!("/internal/v1/tasks/{id}/attempts/1/reports");
    let (status, _, _) = api
        .call(
            Method::POST,
            &url,
            Some(&token_for(&id, 1)),
            Some(&reports),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Without follow, the stream of everything so far, ended although the task runs.
    let (status, _, text) =
        get_text(&api, &key, &format!("/v1/tasks/{id}/events?include=logs")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text.matches("event: log\n").count(), 2, "{text}");
    assert!(
        text.contains("event: state") && !text.contains("event: progress"),
        "{text}"
    );
    end_task(&api, &id).await;
    let (_, _, text) = get_text(
        &api,
        &key,
        &format!("/v1/tasks/{id}/events?follow=true&include=progress,logs"),
    )
    .await;
    let data = |kind: &str| -> Vec<Value> {
        let mut items = Vec::new();
        let mut current = None;
        for line in text.lines() {
            if let Some(event) = line.strip_prefix("event: ") {
                current = Some(event.to_owned());
            } else if let Some(data) = line.strip_prefix("data: ")
                && current.as_deref() == Some(kind)
            {
                items.push(serde_json::from_str(data).unwrap());
            }
        }
        items
    };
    let logs = data("log");
    assert_eq!(logs.len(), 2, "{text}");
    assert_eq!(
        logs[0],
        json!({"attempt": 1, "stream": "stdout", "time": "2026-12-02T10:00:01.25Z", "line": "hello"})
    );
    assert_eq!(logs[1]["stream"], "stderr");
    assert_eq!(
        data("progress"),
        [
            json!({"attempt": 1, "percent": 42.0, "message": "epoch 2/5", "time": "2026-12-02T10:00:01Z"})
        ]
    );
    let moves: Vec<Value> = data("state").iter().map(|e| e["to"].clone()).collect();
    assert_eq!(moves.last(), Some(&json!("succeeded")), "{text}");
    // Without include, only states.
    let (_, _, text) = get_text(&api, &key, &format!("/v1/tasks/{id}/events?follow=true")).await;
    assert!(
        !text.contains("event: log") && text.contains("event: state"),
        "{text}"
    );
}

on_both_stores!(
    lines_are_kept_in_order_and_read_back_every_way,
    the_cap_keeps_a_marker_and_stops_the_runner,
    follow_sends_lines_as_they_come_and_ends_with_the_attempt,
    the_end_allowance_refuses_late_lines_and_retention_purges,
    the_event_stream_includes_progress_and_lines,
);

/// The embedded default: the local executor runs the task through the real runner, which
/// ships its output; the lines are stored by the time the task is seen ended.
#[tokio::test]
async fn the_embedded_default_keeps_stdout_and_stderr_in_order() {
    let local = crate::local::Local::start().await;
    let script = "for i in 1 2 3; do echo out $i; echo err $i >&2; done; printf 'no newline'";
    let id = local
        .submit(json!({"name": "talk", "image": "unused", "command": ["sh", "-c", script]}))
        .await;
    let task = local.wait_until_over(&id).await;
    assert_eq!(task["state"], "succeeded", "{task}");
    let read = |query: &'static str| {
        let local = &local;
        let id = id.clone();
        async move {
            let response = local
                .http
                .get(format!("{}/v1/tasks/{id}/logs{query}", local.base))
                .bearer_auth(&local.key)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }
    };
    let text = read("?timestamps=true").await;
    let of = |stream: &str| -> Vec<String> {
        text.lines()
            .filter_map(|line| {
                let (_time, rest) = line.split_once(' ')?;
                rest.strip_prefix(stream)?
                    .strip_prefix(' ')
                    .map(str::to_owned)
            })
            .collect()
    };
    // Each stream in order; the two pipes are read side by side, so their interleaving
    // is the order the runner read them in.
    assert_eq!(
        of("stdout"),
        ["out 1", "out 2", "out 3", "no newline"],
        "{text}"
    );
    assert_eq!(of("stderr"), ["err 1", "err 2", "err 3"], "{text}");
    assert_eq!(text.lines().count(), 7, "{text}");
    // `tail` without timestamps: the last line read, as the task wrote it.
    let last = text.lines().last().unwrap().splitn(3, ' ').nth(2).unwrap();
    assert_eq!(read("?tail=1").await, format!("{last}\n"));
}
