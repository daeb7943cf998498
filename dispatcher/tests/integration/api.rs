//! The REST API through `router().oneshot()`: every status code the API promises, tenant
//! isolation on every endpoint, idempotency under concurrency, dry runs, pagination and
//! the event stream. Each case runs on a fresh PostgreSQL database and on an SQLite file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use crate::common::{TestApi, api_on, move_between, on_both_stores, task_body};
use axum::http::{Method, StatusCode};
use dispatcher::store::Store;
use dispatcher::task::lifecycle::{Ending, Move};
use dispatcher::task::{TaskId, TaskState};
use serde_json::{Value, json};

on_both_stores!(
    unauthenticated_requests_get_401,
    the_bearer_scheme_is_case_insensitive,
    submit_then_read,
    other_tenants_tasks_are_404_everywhere,
    malformed_json_is_400,
    invalid_fields_are_422_naming_the_field,
    oversized_bodies_are_413,
    full_quota_is_429,
    requests_beyond_the_in_flight_limit_are_shed_at_once,
    idempotency_key_replays_and_conflicts,
    dry_run_returns_the_job_and_stores_nothing,
    list_pages_newest_first_with_a_stable_cursor,
    cancel_is_idempotent,
    events_and_their_stream_follow_the_task_to_its_end,
    health_and_openapi,
    runner_reports_are_idempotent_scoped_and_shown,
    placement_fields_are_resolved_and_checked_per_tenant,
);

async fn unauthenticated_requests_get_401(store: Store) {
    let api = api_on(store, |_| {}).await;
    api.tenant("acme", 10).await;
    let (status, _, body) = api.call(Method::GET, "/v1/tasks", None, None, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _, _) = api
        .call(Method::POST, "/v1/tasks", Some("ab_wrong"), Some("{}"), &[])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// RFC 9110: the scheme of `Authorization` is case-insensitive.
async fn the_bearer_scheme_is_case_insensitive(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let header = format!("{scheme} {key}");
        let (status, _, body) = api
            .call(
                Method::GET,
                "/v1/tasks",
                None,
                None,
                &[("authorization", &header)],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{scheme}: {body}");
    }
    let header = format!("Basic {key}");
    let (status, _, _) = api
        .call(
            Method::GET,
            "/v1/tasks",
            None,
            None,
            &[("authorization", &header)],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn submit_then_read(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let body = json!({
        "name": "train", "image": "pytorch/pytorch:2.4.0", "command": ["python", "train.py"],
        "env": {"EPOCHS": "3"}, "resources": {"cpu": "0.5", "memory": "1Gi", "gpu": {"count": 2, "class": "a100"}},
        "timeout_seconds": 600, "max_retries": 1, "priority": 5, "queue": "gpu", "labels": {"example.com/team": "vision"},
        "annotations": {"example.com/owner": "ml"}
    });
    let (status, _, created) = api
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&key),
            Some(&body.to_string()),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["state"], "queued");
    assert_eq!(
        created["resources"]["cpu"], "500m",
        "quantities come back canonical"
    );
    assert_eq!(created["queue"], "gpu");
    // 2 A100 at $3.67/h, 0.5 core at $0.04/h, 1 GiB at $0.005/h, for the 600 s timeout.
    assert_eq!(
        created["cost_estimate"],
        json!({"per_hour_dollars": 7.365, "max_dollars": 1.2275,
               "basis": "price per hour x timeout_seconds; LLM usage is extra"})
    );
    assert_eq!(
        created["cost"]["total_dollars"], 0.0,
        "nothing spent while queued"
    );
    let mut created = created;
    created.as_object_mut().unwrap().remove("cost_estimate");
    let id = created["id"].as_str().unwrap().to_owned();
    let (status, mut read) = api.get(&key, &format!("/v1/tasks/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let attempts = read.as_object_mut().unwrap().remove("attempts");
    assert_eq!(attempts, Some(json!([])), "no attempt has run yet");
    let wait = read.as_object_mut().unwrap();
    // Alone in its queue and nothing launched in the last 10 minutes: next, and no rate
    // to estimate its start by (null, not absent).
    assert_eq!(wait.remove("queue_position"), Some(json!(1)));
    assert_eq!(wait.remove("estimated_start"), Some(Value::Null));
    assert_eq!(
        read, created,
        "a read is the 201 without the estimate, plus the attempts and the queued task's wait"
    );
    let pending = api.queue.pending_task_ids("gpu").await.unwrap();
    assert!(
        pending.contains(&id.parse::<TaskId>().unwrap()),
        "the task was enqueued"
    );
}

async fn other_tenants_tasks_are_404_everywhere(store: Store) {
    let api = api_on(store, |_| {}).await;
    let acme = api.tenant("acme", 10).await;
    let globex = api.tenant("globex", 10).await;
    let (_, task) = api.submit(&acme, &task_body("secret")).await;
    let id = task["id"].as_str().unwrap();
    for (method, uri) in [
        (Method::GET, format!("/v1/tasks/{id}")),
        (Method::POST, format!("/v1/tasks/{id}/cancel")),
        (Method::GET, format!("/v1/tasks/{id}/events")),
        (Method::GET, format!("/v1/tasks/{id}/events?follow=true")),
    ] {
        let (status, _, body) = api
            .call(method.clone(), &uri, Some(&globex), None, &[])
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    let (_, list) = api.get(&globex, "/v1/tasks").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");
    let (_, own) = api.get(&acme, &format!("/v1/tasks/{id}")).await;
    assert_eq!(
        own["state"], "queued",
        "the other tenant's cancel changed nothing"
    );
}

async fn malformed_json_is_400(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    for body in ["{", "not json", r#"{"name": "a",}"#] {
        let (status, _, value) = api
            .call(Method::POST, "/v1/tasks", Some(&key), Some(body), &[])
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {value}");
        assert_eq!(value["error"]["code"], "malformed_json");
    }
}

async fn invalid_fields_are_422_naming_the_field(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let with = |change: &dyn Fn(&mut Value)| {
        let mut body = task_body("ok");
        change(&mut body);
        body
    };
    let cases: Vec<(Value, &str)> = vec![
        (with(&|b| b["name"] = json!("Not_A_Label")), "name"),
        (with(&|b| b["name"] = json!("x".repeat(64))), "name"),
        (
            with(&|b| b["resources"] = json!({"cpu": "-1"})),
            "resources.cpu",
        ),
        (
            with(&|b| b["resources"] = json!({"memory": "lots"})),
            "resources.memory",
        ),
        (
            with(&|b| b["resources"] = json!({"gpu": {"count": 1, "class": "k80"}})),
            "resources.gpu.class",
        ),
        (
            with(&|b| b["timeout_seconds"] = json!(0)),
            "timeout_seconds",
        ),
        (
            with(&|b| b["timeout_seconds"] = json!(-5)),
            "timeout_seconds",
        ),
        (with(&|b| b["gpus"] = json!(1)), "gpus"),
        // serde's derive would read an array as the struct's fields in order.
        (
            with(&|b| b["retry_policy"] = json!([null, null])),
            "retry_policy",
        ),
        (
            with(&|b| b["resources"] = json!({"gpu": [1, "a100"]})),
            "resources.gpu",
        ),
        (with(&|b| b["webhook"] = json!(["http://x"])), "webhook"),
        (
            with(&|b| b.as_object_mut().unwrap().remove("image").map_or((), drop)),
            "image",
        ),
        (
            with(&|b| b["resources"] = json!({"gpu": {"count": 1}})),
            "resources.gpu.class",
        ),
        (
            with(&|b| b["resources"] = json!({"gpu": {"count": 1, "class": "a100", "mig": true}})),
            "resources.gpu.mig",
        ),
        (
            with(&|b| b["env"] = json!({"BAD NAME": "x"})),
            "env.BAD NAME",
        ),
        (
            with(&|b| {
                b["env"] = json!(
                    (0..200)
                        .map(|i| (format!("V{i}"), json!("x")))
                        .collect::<serde_json::Map<_, _>>()
                );
            }),
            "env",
        ),
        (
            with(&|b| b["labels"] = json!({"example.com/team": "x".repeat(64)})),
            "labels.example.com/team",
        ),
        (
            with(&|b| b["labels"] = json!({"team": "vision"})),
            "labels.team",
        ),
        (with(&|b| b["command"] = json!("not a list")), "command"),
    ];
    for (body, field) in cases {
        let (status, value) = api.submit(&key, &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {value}");
        assert_eq!(value["error"]["field"], field, "{value}");
        assert!(!value["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, _, value) = api
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&key),
            Some(&task_body("ok").to_string()),
            &[("idempotency-key", "")],
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{value}");
    assert_eq!(value["error"]["field"], "Idempotency-Key");
    let (_, list) = api.get(&key, "/v1/tasks").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        0,
        "nothing refused was stored"
    );
}

async fn oversized_bodies_are_413(store: Store) {
    let api = api_on(store, |state| state.max_body_bytes = 1024).await;
    let key = api.tenant("acme", 10).await;
    let mut body = task_body("big");
    body["args"] = json!(["x".repeat(4096)]);
    let (status, value) = api.submit(&key, &body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{value}");
    assert_eq!(value["error"]["code"], "payload_too_large");
}

async fn full_quota_is_429(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 2).await;
    for i in 0..2 {
        assert_eq!(
            api.submit(&key, &task_body(&format!("t{i}"))).await.0,
            StatusCode::CREATED
        );
    }
    let (status, value) = api.submit(&key, &task_body("t3")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{value}");
    assert_eq!(value["error"]["code"], "quota_exceeded");
}

async fn requests_beyond_the_in_flight_limit_are_shed_at_once(store: Store) {
    let api = api_on(store, |state| {
        state.admission = dispatcher::api::admission::Admission::new(2);
    })
    .await;
    let key = api.tenant("acme", 10).await;
    // Two requests in flight fill the slots.
    let first = api.state.admission.try_take().unwrap();
    let _second = api.state.admission.try_take().unwrap();

    let (status, headers, value) = api
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&key),
            Some(&task_body("shed").to_string()),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{value}");
    assert_eq!(value["error"]["code"], "overloaded", "{value}");
    assert!(
        value["error"]["message"]
            .as_str()
            .unwrap()
            .contains("handling 2 requests, its limit"),
        "{value}"
    );
    assert_eq!(headers["retry-after"], "1");
    // A shed submit did nothing.
    let (_, listed) = api.get(&key, "/v1/tasks").await;
    assert_eq!(listed["error"]["code"], "overloaded", "{listed}");
    // The probes are never shed: the dispatcher is alive and ready, only busy.
    let (status, _, _) = api.call(Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let metrics = api.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(
        metrics.0,
        StatusCode::NOT_FOUND,
        "no /metrics on the api router"
    );

    // A finished request frees its slot.
    drop(first);
    assert_eq!(
        api.submit(&key, &task_body("admitted")).await.0,
        StatusCode::CREATED
    );
    let (status, listed) = api.get(&key, "/v1/tasks").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admitted"]);
}

async fn idempotency_key_replays_and_conflicts(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 1000).await;
    let body = task_body("once").to_string();
    let headers = [("idempotency-key", "order-42")];
    let (first, _, created) = api
        .call(Method::POST, "/v1/tasks", Some(&key), Some(&body), &headers)
        .await;
    assert_eq!(first, StatusCode::CREATED);
    // The same request with other whitespace is the same request.
    let spaced = serde_json::to_string_pretty(&task_body("once")).unwrap();
    let (again, replay_headers, replayed) = api
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&key),
            Some(&spaced),
            &headers,
        )
        .await;
    assert_eq!(again, StatusCode::OK);
    assert_eq!(replayed["id"], created["id"]);
    assert_eq!(replay_headers.get("idempotent-replayed").unwrap(), "true");
    let (conflict, _, value) = api
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&key),
            Some(&task_body("other").to_string()),
            &headers,
        )
        .await;
    assert_eq!(conflict, StatusCode::CONFLICT, "{value}");
    assert_eq!(value["error"]["code"], "idempotency_key_reused");

    // 50 concurrent requests with one new key: one task.
    let requests = (0..50).map(|_| {
        let api: TestApi = api.clone();
        let key = key.clone();
        async move {
            let body = task_body("burst").to_string();
            api.call(
                Method::POST,
                "/v1/tasks",
                Some(&key),
                Some(&body),
                &[("idempotency-key", "burst-1")],
            )
            .await
        }
    });
    let responses = futures::future::join_all(requests).await;
    let ids: HashSet<String> = responses
        .iter()
        .map(|(status, _, body)| {
            assert!(
                matches!(*status, StatusCode::CREATED | StatusCode::OK),
                "{status}: {body}"
            );
            body["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(
        responses
            .iter()
            .filter(|(s, _, _)| *s == StatusCode::CREATED)
            .count(),
        1
    );
    let (_, list) = api.get(&key, "/v1/tasks?limit=500").await;
    let bursts = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "burst")
        .count();
    assert_eq!(bursts, 1);
}

async fn dry_run_returns_the_job_and_stores_nothing(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let mut body = task_body("preview");
    body["resources"] = json!({"gpu": {"count": 1, "class": "v100"}});
    let (status, _, value) = api
        .call(
            Method::POST,
            "/v1/tasks?dry_run=true",
            Some(&key),
            Some(&body.to_string()),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{value}");
    let job = &value["job"];
    assert_eq!(job["kind"], "Job");
    assert_eq!(
        job["spec"]["template"]["spec"]["nodeSelector"]["accelerator"],
        "nvidia-tesla-v100"
    );
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    let (_, list) = api.get(&key, "/v1/tasks").await;
    assert!(list["items"].as_array().unwrap().is_empty());
    let (status, _, value) = api
        .call(
            Method::POST,
            "/v1/tasks?dry_run=true",
            Some(&key),
            Some(r#"{"name":"x"}"#),
            &[],
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a dry run validates too: {value}"
    );
}

async fn list_pages_newest_first_with_a_stable_cursor(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 100).await;
    let mut submitted = Vec::new();
    for i in 0..7 {
        let mut body = task_body(&format!("t{i}"));
        body["labels"] = json!({"example.com/parity": if i % 2 == 0 { "even" } else { "odd" }});
        body["queue"] = json!(if i < 3 { "a" } else { "b" });
        submitted.push(
            api.submit(&key, &body).await.1["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut seen = Vec::new();
    let mut uri = "/v1/tasks?limit=3".to_owned();
    loop {
        let (status, page) = api.get(&key, &uri).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/v1/tasks?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    submitted.reverse();
    assert_eq!(seen, submitted, "every task once, newest first");
    let (_, odd) = api
        .get(&key, "/v1/tasks?label=example.com%2Fparity%3Dodd")
        .await;
    assert_eq!(odd["items"].as_array().unwrap().len(), 3);
    let (_, queue_a) = api.get(&key, "/v1/tasks?queue=a").await;
    assert_eq!(queue_a["items"].as_array().unwrap().len(), 3);
    let (_, queued) = api.get(&key, "/v1/tasks?state=queued").await;
    assert_eq!(queued["items"].as_array().unwrap().len(), 7);
    for (query, field) in [
        ("state=done", "state"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("cursor=zzz", "cursor"),
        ("label=novalue", "label"),
    ] {
        let (status, value) = api.get(&key, &format!("/v1/tasks?{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {value}");
        assert_eq!(value["error"]["field"], field);
    }
}

async fn cancel_is_idempotent(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let (_, task) = api.submit(&key, &task_body("stop-me")).await;
    let uri = format!("/v1/tasks/{}/cancel", task["id"].as_str().unwrap());
    for _ in 0..2 {
        let (status, _, cancelled) = api.call(Method::POST, &uri, Some(&key), None, &[]).await;
        assert_eq!(status, StatusCode::OK, "{cancelled}");
        assert_eq!(cancelled["state"], "cancelled");
        assert_eq!(cancelled["reason"], "cancelled_by_user");
    }
    let (status, _, _) = api
        .call(
            Method::POST,
            "/v1/tasks/not-a-uuid/cancel",
            Some(&key),
            None,
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn events_and_their_stream_follow_the_task_to_its_end(store: Store) {
    let api = api_on(store.clone(), |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let (_, task) = api.submit(&key, &task_body("followed")).await;
    let id: TaskId = task["id"].as_str().unwrap().parse().unwrap();
    // Drive the task to its end from another task while the stream is open.
    let lifecycle = api.lifecycle().clone();
    let driver = tokio::spawn(async move {
        for (from, to) in [
            (TaskState::Queued, TaskState::Launching),
            (TaskState::Launching, TaskState::Launched),
            (TaskState::Launched, TaskState::Running),
        ] {
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            lifecycle
                .apply(id, from, move_between(from, to))
                .await
                .unwrap()
                .unwrap();
        }
        let failed = Move::Ended(Ending::new(TaskState::Failed).exit_code(3));
        lifecycle
            .apply(id, TaskState::Running, failed)
            .await
            .unwrap()
            .unwrap();
    });
    let (status, headers, body) = api
        .call(
            Method::GET,
            &format!("/v1/tasks/{id}/events?follow=true"),
            Some(&key),
            None,
            &[],
        )
        .await;
    driver.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = body.as_str().unwrap();
    let history: Vec<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| {
            serde_json::from_str::<Value>(data).unwrap()["to"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        history,
        ["queued", "launching", "launched", "running", "failed"],
        "{text}"
    );
    let (_, events) = api.get(&key, &format!("/v1/tasks/{id}/events")).await;
    let items = events["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(items[4]["exit_code"], 3);
}

async fn health_and_openapi(store: Store) {
    let api = api_on(store, |_| {}).await;
    let (status, _, body) = api.call(Method::GET, "/healthz", None, None, &[]).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, _, body) = api.call(Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The metrics are on the metrics listener only.
    let (status, _, _) = api.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, headers, doc) = api
        .call(Method::GET, "/openapi.json", None, None, &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers.get("x-request-id").is_some(),
        "every response carries a request id"
    );
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/tasks",
        "/v1/tasks/{id}",
        "/v1/tasks/{id}/cancel",
        "/v1/tasks/{id}/events",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"].get("Submission").is_some());
}

/// Moves a queued task to `launched`, as the launcher would.
async fn launch(api: &TestApi, id: &str) {
    let id: TaskId = id.parse().unwrap();
    let lifecycle = api.lifecycle();
    assert!(matches!(
        lifecycle.claim(id).await.unwrap(),
        dispatcher::lifecycle::Claim::Claimed(_)
    ));
    lifecycle
        .apply(id, TaskState::Launching, Move::Launched)
        .await
        .unwrap()
        .unwrap();
}

fn token_for(id: &str, attempt: u32, valid_for_seconds: i64) -> String {
    let tokens = dispatcher::report::ReportTokens::new(crate::common::TEST_REPORT_KEY);
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(valid_for_seconds);
    tokens.mint(id.parse().unwrap(), attempt, expires)
}

async fn runner_reports_are_idempotent_scoped_and_shown(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let (_, task) = api.submit(&key, &task_body("reported")).await;
    let (_, other) = api.submit(&key, &task_body("other")).await;
    let id = task["id"].as_str().unwrap();
    let other_id = other["id"].as_str().unwrap();
    launch(&api, id).await;
    let url = format!("/internal/v1/tasks/{id}/attempts/1/reports");
    let token = token_for(id, 1, 3600);
    let batch = json!({"reports": [
        {"sequence": 1, "sent_at": "2026-11-29T23:00:00Z", "kind": "started", "hostname": "gpu-a100-0", "runner_version": "0.1.0",
         "gpus": [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "memory_total_bytes": 85_899_345_920_u64}]},
        {"sequence": 2, "sent_at": "2026-11-29T23:00:15Z", "kind": "heartbeat", "uptime_seconds": 15.0,
         "gpus": [{"index": 0, "utilization_percent": 97.0, "memory_used_bytes": 1000}]},
        {"sequence": 3, "sent_at": "2026-11-29T23:00:16Z", "kind": "progress", "percent": 40.0, "message": "epoch 2/5"},
        {"sequence": 4, "sent_at": "2026-11-29T23:00:17Z", "kind": "usage", "model": "gpt-4o", "calls": 1,
         "input_tokens": 1200, "output_tokens": 300, "cost_usd": 0.0123},
    ]})
    .to_string();
    let (status, _, receipt) = api
        .call(Method::POST, &url, Some(&token), Some(&batch), &[])
        .await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(receipt, json!({"accepted": 4, "duplicates": 0}));
    let (_, read) = api.get(&key, &format!("/v1/tasks/{id}")).await;
    assert_eq!(
        read["state"], "running",
        "started moves the task to running: {read}"
    );

    // The runner resends after a lost response: nothing is counted twice.
    let (status, _, receipt) = api
        .call(Method::POST, &url, Some(&token), Some(&batch), &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        receipt,
        json!({"accepted": 1, "duplicates": 3}),
        "only the heartbeat is new"
    );
    let finished = json!({"reports": [
        {"sequence": 5, "sent_at": "2026-11-29T23:01:00Z", "kind": "finished", "exit_code": 1, "failure_class": "cuda_oom",
         "duration_seconds": 60.5, "stderr_tail": "torch.OutOfMemoryError: CUDA out of memory",
         "gpu": {"gpus": 1, "samples": 12, "utilization_mean_percent": 88.0, "utilization_max_percent": 100.0}}
    ]})
    .to_string();
    let (status, _, _) = api
        .call(Method::POST, &url, Some(&token), Some(&finished), &[])
        .await;
    assert_eq!(status, StatusCode::OK);

    let (_, read) = api.get(&key, &format!("/v1/tasks/{id}")).await;
    let runner = &read["runner"];
    assert_eq!(runner["hostname"], "gpu-a100-0", "{read}");
    assert_eq!(runner["progress"]["percent"], 40.0);
    assert_eq!(runner["progress"]["message"], "epoch 2/5");
    assert_eq!(runner["usage"][0]["model"], "gpt-4o");
    assert_eq!(
        runner["usage"][0]["calls"], 1,
        "usage counted once despite the resend"
    );
    assert_eq!(runner["usage_cost_usd"], 0.0123);
    assert_eq!(runner["gpu_now"][0]["utilization_percent"], 97.0);
    assert!(runner["last_heartbeat_at"].is_string());
    assert_eq!(runner["outcome"]["failure_class"], "cuda_oom");
    assert_eq!(runner["outcome"]["source"], "runner");
    assert_eq!(runner["outcome"]["gpu"]["utilization_mean_percent"], 88.0);

    // Scoping: a token speaks for its own task attempt only.
    let other_url = format!("/internal/v1/tasks/{other_id}/attempts/1/reports");
    let (status, _, body) = api
        .call(Method::POST, &other_url, Some(&token), Some(&batch), &[])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    let attempt_two = format!("/internal/v1/tasks/{id}/attempts/2/reports");
    let (status, _, _) = api
        .call(Method::POST, &attempt_two, Some(&token), Some(&batch), &[])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // No, expired, forged tokens, or a tenant key: 401.
    let expired = token_for(id, 1, -10);
    let forged = dispatcher::report::ReportTokens::new(b"someone else's key, 32 bytes long").mint(
        id.parse().unwrap(),
        1,
        jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
    );
    for bad in [
        None,
        Some(expired.as_str()),
        Some(forged.as_str()),
        Some(key.as_str()),
    ] {
        let (status, _, body) = api.call(Method::POST, &url, bad, Some(&batch), &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad:?}: {body}");
    }
    // A well-signed token of a task that does not exist: 404.
    let ghost = TaskId::new().to_string();
    let ghost_url = format!("/internal/v1/tasks/{ghost}/attempts/1/reports");
    let (status, _, _) = api
        .call(
            Method::POST,
            &ghost_url,
            Some(&token_for(&ghost, 1, 60)),
            Some(&batch),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A report that breaks a rule names its field.
    let bad =
        json!({"reports": [{"sequence": 9, "sent_at": "x", "kind": "progress", "percent": 140.0}]})
            .to_string();
    let (status, _, body) = api
        .call(Method::POST, &url, Some(&token), Some(&bad), &[])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "reports[0].percent");
}

async fn placement_fields_are_resolved_and_checked_per_tenant(store: Store) {
    use dispatcher::placement::SharedClaim;
    let api = api_on(store, |state| {
        let claims = [
            ("models", vec!["*"], false),
            ("datasets", vec!["globex"], true),
        ]
        .into_iter()
        .map(|(name, tenants, writable)| {
            (
                name.to_owned(),
                SharedClaim {
                    name: name.to_owned(),
                    tenants: tenants.into_iter().map(str::to_owned).collect(),
                    writable,
                },
            )
        })
        .collect();
        let limits = std::sync::Arc::make_mut(&mut state.limits);
        limits.volume_claims = claims;
    })
    .await;
    let acme = api.tenant("acme", 10).await;
    let globex = api.tenant("globex", 10).await;
    let body = json!({
        "name": "train", "image": "nvcr.io/nvidia/pytorch:24.08-py3", "command": ["torchrun", "train.py"],
        "resources": {"memory": "64Gi", "gpu": {"count": 8, "class": "a100"}},
        "volumes": [{"claim": "models", "mount_path": "/models"}, {"claim": "datasets"}],
        "scratch": {"size": "200Gi"}
    });
    let (status, refused) = api.submit(&acme, &body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["error"]["field"], "volumes[1].claim");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not shared with tenant 'acme'")
    );

    let (status, created) = api.submit(&globex, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["workload"], "ml");
    assert_eq!(created["shm"], "16Gi", "a quarter of 64Gi");
    assert_eq!(created["gpu_class"], "a100");
    assert_eq!(created["volumes"][1]["mount_path"], "/mnt/datasets");
    assert_eq!(created["volumes"][1]["read_only"], true);
    assert_eq!(created["scratch"]["size"], "200Gi");

    let too_many = json!({"name": "big", "image": "busybox", "command": ["true"],
        "resources": {"gpu": {"count": 9, "class": "h100"}}});
    let (status, refused) = api.submit(&globex, &too_many).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused["error"]["field"], "resources.gpu.count");
    let unknown = json!({"name": "tpu", "image": "busybox", "command": ["true"],
        "resources": {"gpu": {"count": 1, "class": "tpu-v5"}}});
    let (status, refused) = api.submit(&globex, &unknown).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused["error"]["field"], "resources.gpu.class");
}
