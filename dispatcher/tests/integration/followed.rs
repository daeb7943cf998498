//! Followed streams are bounded: a tenant holds at most `--max-streams-per-tenant` of
//! them per process (429 `too_many_streams` above it, before anything is read), a closed
//! one frees its place, and none outlives `--max-stream-duration`. Each case runs on a
//! fresh PostgreSQL database and on an SQLite file.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use dispatcher::api::streams::OpenStreams;
use dispatcher::store::Store;
use tower::ServiceExt as _;

use crate::common::{TestApi, api_on, on_both_stores, task_body};

on_both_stores!(a_tenant_follows_a_bounded_number_of_streams_for_a_bounded_time);

/// `GET uri` with `key`, the response as it comes: its body is not read, so a followed
/// stream stays open (and holds its place) until the response is dropped.
async fn open(api: &TestApi, key: &str, uri: &str) -> axum::response::Response {
    let request = Request::get(uri)
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    api.router.clone().oneshot(request).await.unwrap()
}

async fn a_tenant_follows_a_bounded_number_of_streams_for_a_bounded_time(store: Store) {
    const MAX_DURATION: Duration = Duration::from_millis(500);
    let api = api_on(store, |state| {
        state.streams = Arc::new(OpenStreams::new(2, MAX_DURATION));
    })
    .await;
    let key = api.tenant("acme", 10).await;
    let other = api.tenant("globex", 10).await;
    let (_, task) = api.submit(&key, &task_body("never-launched")).await;
    let id = task["id"].as_str().unwrap();
    let events = format!("/v1/tasks/{id}/events?follow=true");
    let logs = format!("/v1/tasks/{id}/logs?follow=true");

    // Two followed streams of any kind fill the tenant's places.
    let first = open(&api, &key, &events).await;
    assert_eq!(first.status(), StatusCode::OK);
    let second = open(&api, &key, &logs).await;
    assert_eq!(second.status(), StatusCode::OK);
    for uri in [&events, &logs] {
        let (status, headers, body) = api
            .call(axum::http::Method::GET, uri, Some(&key), None, &[])
            .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{uri}: {body}");
        assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("already follows 2 streams"),
            "{body}"
        );
        assert_eq!(headers["retry-after"], "10");
    }
    // What does not stay open is not counted: the history, a snapshot of the stream, a
    // plain read of the output.
    for uri in [
        format!("/v1/tasks/{id}/events"),
        format!("/v1/tasks/{id}/events?include=logs"),
        format!("/v1/tasks/{id}/logs"),
    ] {
        let (status, _, body) = api
            .call(axum::http::Method::GET, &uri, Some(&key), None, &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
    }
    // Another tenant has places of its own (and sees a 404 for this task, as always).
    let (status, _, _) = api
        .call(axum::http::Method::GET, &events, Some(&other), None, &[])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A closed stream frees its place.
    drop(second);
    let third = open(&api, &key, &logs).await;
    assert_eq!(third.status(), StatusCode::OK);

    // The task never ends, yet both streams end after the longest a stream may last
    // (a bound on the wait keeps a regression from hanging the test).
    for response in [first, third] {
        let ended = tokio::time::timeout(
            Duration::from_mins(1),
            axum::body::to_bytes(response.into_body(), 1024 * 1024),
        )
        .await;
        assert!(
            matches!(ended, Ok(Ok(_))),
            "a followed stream outlived --max-stream-duration"
        );
    }
    // Both places are free again.
    let fourth = open(&api, &key, &events).await;
    assert_eq!(fourth.status(), StatusCode::OK);
    let fifth = open(&api, &key, &logs).await;
    assert_eq!(fifth.status(), StatusCode::OK);
}
