//! Followed event streams read the store through one shared poller per process: many
//! followers of different tasks cost one store read per tick between them (counted by
//! `agent_bus_store_queries_total`), each still gets exactly its task's events in order,
//! and a follower too slow for its channel reads what it missed from the store. Followed
//! output learns its attempt's end from the same poller, and reads its lines only when the
//! poller's one read of output marks says there are new ones. Each case
//! runs on a fresh PostgreSQL database and on an SQLite file.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use dispatcher::store::{LogLimits, NewLogLine, Store};
use dispatcher::task::lifecycle::PlannedNote;
use dispatcher::task::{Reason, TaskId, TaskState};
use http_body_util::BodyExt as _;
use protocol::LogStream;
use serde_json::Value;
use tokio::task::JoinHandle;
use tower::ServiceExt as _;

use crate::common::{TestApi, api_on, move_between, on_both_stores, task_body};

on_both_stores!(
    many_followers_of_different_tasks_cost_one_read_per_tick,
    a_follower_behind_its_channel_reads_what_it_missed_from_the_store,
);

/// How many times the store ran `operation` (answered), from the metrics listener.
async fn store_reads(api: &TestApi, operation: &str) -> u64 {
    let request = Request::get("/metrics").body(Body::empty()).unwrap();
    let response = api.metrics_router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
        .await
        .unwrap();
    let body = String::from_utf8(body.to_vec()).unwrap();
    let label = format!("operation=\"{operation}\"");
    body.lines()
        .filter(|line| {
            line.starts_with("agent_bus_store_queries_total{")
                && line.contains(&label)
                && line.contains("outcome=\"ok\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Opens `GET /v1/tasks/{id}/events?follow=true` and reads the stream to its end in a
/// task of its own; the answer is the `data:` of each event, parsed.
async fn follow(api: &TestApi, key: &str, id: TaskId) -> JoinHandle<Vec<Value>> {
    let request = Request::get(format!("/v1/tasks/{id}/events?follow=true"))
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    tokio::spawn(async move {
        let body = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap();
        String::from_utf8(body.to_vec())
            .unwrap()
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(|data| serde_json::from_str(data).unwrap())
            .collect()
    })
}

/// Opens `GET /v1/tasks/{id}/logs?follow=true` and reads it to its end in a task of its
/// own; the answer is the text.
async fn follow_output(api: &TestApi, key: &str, id: TaskId) -> JoinHandle<String> {
    let request = Request::get(format!("/v1/tasks/{id}/logs?follow=true"))
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    tokio::spawn(async move {
        let body = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    })
}

/// The stream's events are the task's stored events, each once, in order.
async fn assert_exactly_its_events(store: &Store, id: TaskId, streamed: &[Value]) {
    let stored: Vec<i64> = store
        .events(id, None)
        .await
        .unwrap()
        .iter()
        .map(|event| event.id)
        .collect();
    let streamed: Vec<i64> = streamed
        .iter()
        .map(|event| event["id"].as_i64().unwrap())
        .collect();
    assert_eq!(streamed, stored, "task {id}");
}

async fn many_followers_of_different_tasks_cost_one_read_per_tick(store: Store) {
    const TASKS: usize = 10;
    /// The tests' follow_poll.
    const TICK: Duration = Duration::from_millis(50);
    const WINDOW: Duration = Duration::from_secs(1);
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 100).await;
    let mut ids = Vec::new();
    for n in 0..TASKS {
        let (_, task) = api.submit(&key, &task_body(&format!("t{n}"))).await;
        ids.push(task["id"].as_str().unwrap().parse::<TaskId>().unwrap());
    }
    let mut readers = Vec::new();
    let mut outputs = Vec::new();
    for &id in &ids {
        readers.push(follow(&api, &key, id).await);
        outputs.push(follow_output(&api, &key, id).await);
    }
    // Every stream has read its history (one read each, at its start).
    let settled = tokio::time::Instant::now() + Duration::from_secs(30);
    while api.state.event_feed.followed_tasks() < TASKS {
        assert!(
            tokio::time::Instant::now() < settled,
            "the feed never followed every task"
        );
        tokio::time::sleep(TICK).await;
    }
    tokio::time::sleep(4 * TICK).await;

    let feed_before = store_reads(&api, "events_of_followed").await;
    let events_before = store_reads(&api, "events").await;
    let tasks_before = store_reads(&api, "get_task").await;
    let lines_before = store_reads(&api, "log_lines").await;
    let marks_before = store_reads(&api, "output_marks").await;
    tokio::time::sleep(WINDOW).await;
    let feed_reads = store_reads(&api, "events_of_followed").await - feed_before;
    // One read per tick for all ten (a tick is the read plus the wait), never one per
    // stream: ten streams polling on their own would make two hundred or more.
    let most = (WINDOW.as_millis() / TICK.as_millis()) as u64 + 2;
    assert!(
        (1..=most).contains(&feed_reads),
        "{feed_reads} feed reads in {WINDOW:?} for {TASKS} followed tasks"
    );
    assert_eq!(
        store_reads(&api, "events").await - events_before,
        0,
        "no stream reads its own events"
    );
    assert_eq!(
        store_reads(&api, "get_task").await - tasks_before,
        0,
        "no stream reads its task (a followed output learns the end from the feed too)"
    );
    // Idle output costs one read of marks per tick for all ten, and no stream's own.
    let marks = store_reads(&api, "output_marks").await - marks_before;
    assert!(
        (1..=most).contains(&marks),
        "{marks} output-mark reads in {WINDOW:?} for {TASKS} followed outputs"
    );
    assert_eq!(
        store_reads(&api, "log_lines").await - lines_before,
        0,
        "no followed output reads its lines while none are new"
    );

    // Each task runs, writes a line (which moves its mark: its stream reads it while
    // the task runs), and ends, interleaved with the others'.
    let lifecycle = api.lifecycle().clone();
    for (from, to) in [
        (TaskState::Queued, TaskState::Launching),
        (TaskState::Launching, TaskState::Launched),
        (TaskState::Launched, TaskState::Running),
    ] {
        for &id in &ids {
            lifecycle
                .apply(id, from, move_between(from, to))
                .await
                .unwrap()
                .unwrap();
        }
    }
    let lines_before = store_reads(&api, "log_lines").await;
    for &id in &ids {
        let line = NewLogLine {
            sequence: 0,
            stream: LogStream::Stdout,
            at: jiff::Timestamp::now(),
            line: format!("hello from {id}"),
        };
        api.store
            .record_logs(id, 1, &[line], &LogLimits::default())
            .await
            .unwrap();
    }
    let moved = tokio::time::Instant::now() + Duration::from_secs(30);
    while store_reads(&api, "log_lines").await - lines_before < TASKS as u64 {
        assert!(
            tokio::time::Instant::now() < moved,
            "the followed outputs never read their new lines"
        );
        tokio::time::sleep(TICK).await;
    }
    for (from, to) in [(TaskState::Running, TaskState::Succeeded)] {
        for &id in &ids {
            lifecycle
                .apply(id, from, move_between(from, to))
                .await
                .unwrap()
                .unwrap();
        }
    }
    for (id, reader) in ids.iter().zip(readers) {
        let streamed = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("a followed stream outlived its task")
            .unwrap();
        let states: Vec<&str> = streamed.iter().map(|e| e["to"].as_str().unwrap()).collect();
        assert_eq!(
            states,
            ["queued", "launching", "launched", "running", "succeeded"],
            "task {id}"
        );
        assert_exactly_its_events(&api.store, *id, &streamed).await;
    }
    for (id, output) in ids.iter().zip(outputs) {
        let text = tokio::time::timeout(Duration::from_secs(30), output)
            .await
            .expect("a followed output outlived its task")
            .unwrap();
        assert_eq!(text, format!("hello from {id}\n"));
    }
    // Nobody follows anything: the loop stops, and so do its reads.
    let stopped = tokio::time::Instant::now() + Duration::from_secs(30);
    while api.state.event_feed.followed_tasks() > 0 {
        assert!(
            tokio::time::Instant::now() < stopped,
            "the feed kept its tasks"
        );
        tokio::time::sleep(TICK).await;
    }
    let idle = store_reads(&api, "events_of_followed").await;
    tokio::time::sleep(4 * TICK).await;
    assert_eq!(store_reads(&api, "events_of_followed").await, idle);
}

async fn a_follower_behind_its_channel_reads_what_it_missed_from_the_store(store: Store) {
    /// More than a channel keeps.
    const NOTES: usize = 3 * dispatcher::api::event_feed::CHANNEL_CAPACITY;
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let (_, task) = api.submit(&key, &task_body("chatty")).await;
    let id: TaskId = task["id"].as_str().unwrap().parse().unwrap();
    let lifecycle = api.lifecycle().clone();
    for (from, to) in [
        (TaskState::Queued, TaskState::Launching),
        (TaskState::Launching, TaskState::Launched),
    ] {
        lifecycle
            .apply(id, from, move_between(from, to))
            .await
            .unwrap()
            .unwrap();
    }
    // The stream reads its history, then its body is not read for a while: its channel
    // fills while the notes are written, and drops the oldest.
    let request = Request::get(format!("/v1/tasks/{id}/events?follow=true"))
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    while text.matches("data: ").count() < 3 {
        let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
            .await
            .expect("the history never came")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    for n in 0..NOTES {
        api.store
            .record_note(
                id,
                &PlannedNote {
                    state: TaskState::Launched,
                    reason: Reason::Unschedulable,
                    message: format!("0/{n} nodes are available"),
                    at: jiff::Timestamp::now(),
                },
            )
            .await
            .unwrap()
            .unwrap();
    }
    // The feed published them all past the channel's capacity.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (from, to) in [
        (TaskState::Launched, TaskState::Running),
        (TaskState::Running, TaskState::Failed),
    ] {
        lifecycle
            .apply(id, from, move_between(from, to))
            .await
            .unwrap()
            .unwrap();
    }
    let rest = tokio::time::timeout(
        Duration::from_secs(30),
        axum::body::to_bytes(body, 16 * 1024 * 1024),
    )
    .await
    .expect("the stream outlived its task")
    .unwrap();
    text.push_str(std::str::from_utf8(&rest).unwrap());
    let streamed: Vec<Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert_eq!(streamed.len(), 3 + NOTES + 2);
    assert_exactly_its_events(&api.store, id, &streamed).await;
}
