//! `GET /v1/tasks` views and its byte cap: a list page holds summaries without the spec's
//! heavy parts unless `view=full`; a page stops before its items pass the byte cap (after
//! at least one) and its cursor goes on, so pages chained through `next_cursor` return
//! every task exactly once. Each case runs on a fresh PostgreSQL database and on an
//! SQLite file.

use std::collections::HashSet;

use axum::http::StatusCode;
use dispatcher::store::Store;
use serde_json::{Value, json};

use crate::common::{TestApi, api_on, on_both_stores, task_body};

on_both_stores!(
    summaries_omit_the_spec_and_the_full_view_has_it,
    pages_past_the_byte_cap_go_on_and_return_every_task_once,
);

/// Every page of `uri` (which has a `?`), followed through `next_cursor`.
async fn every_page(api: &TestApi, key: &str, uri: &str) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut next = uri.to_owned();
    loop {
        let (status, page) = api.get(key, &next).await;
        assert_eq!(status, StatusCode::OK, "{next}: {page}");
        let cursor = page["next_cursor"].as_str().map(str::to_owned);
        pages.push(page);
        match cursor {
            Some(cursor) => next = format!("{uri}&cursor={cursor}"),
            None => return pages,
        }
    }
}

async fn summaries_omit_the_spec_and_the_full_view_has_it(store: Store) {
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("acme", 10).await;
    let body = json!({
        "name": "train", "image": "pytorch/pytorch:2.4.0", "command": ["python", "train.py"],
        "args": ["--epochs", "3"], "env": {"EPOCHS": "3"},
        "resources": {"cpu": "0.5", "memory": "1Gi", "gpu": {"count": 2, "class": "a100"}},
        "priority": 5, "queue": "gpu", "labels": {"example.com/team": "vision"},
        "annotations": {"example.com/owner": "ml"}
    });
    let (status, created) = api.submit(&key, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");

    let (status, page) = api.get(&key, "/v1/tasks").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let (_, explicit) = api.get(&key, "/v1/tasks?view=summary").await;
    assert_eq!(page, explicit, "summary is the default");
    let summary = &page["items"][0];
    for heavy in ["command", "args", "env", "annotations", "labels", "volumes"] {
        assert!(
            summary.get(heavy).is_none(),
            "{heavy} in a summary: {summary}"
        );
    }
    // What `agent-bus list` and `list -o wide` print is there, as the task has it.
    for field in [
        "id",
        "tenant",
        "name",
        "queue",
        "priority",
        "image",
        "resources",
        "state",
        "attempt",
        "created_at",
        "updated_at",
        "cost",
    ] {
        assert_eq!(summary[field], created[field], "{field}: {summary}");
    }
    assert_eq!(
        summary["resources"]["gpu"],
        json!({"count": 2, "class": "a100", "allow_fallback": true})
    );

    let (status, full) = api.get(&key, "/v1/tasks?view=full").await;
    assert_eq!(status, StatusCode::OK, "{full}");
    let item = &full["items"][0];
    assert_eq!(item["command"], json!(["python", "train.py"]), "{item}");
    assert_eq!(item["env"]["EPOCHS"], "3", "{item}");
    assert_eq!(item["annotations"]["example.com/owner"], "ml", "{item}");
    // A full item has every field of a summary, with the same values.
    for (field, value) in summary.as_object().unwrap() {
        assert_eq!(&item[field], value, "{field}");
    }

    for query in ["view=bogus", "view=", "view=FULL"] {
        let (status, value) = api.get(&key, &format!("/v1/tasks?{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {value}");
        assert_eq!(value["error"]["code"], "invalid_field", "{value}");
        assert_eq!(value["error"]["field"], "view", "{value}");
    }
}

async fn pages_past_the_byte_cap_go_on_and_return_every_task_once(store: Store) {
    /// Each task carries about 20 KiB of environment: three whole tasks pass the cap.
    const CAP: usize = 50 * 1024;
    let api = api_on(store, |state| state.list_page_max_bytes = CAP).await;
    let key = api.tenant("acme", 100).await;
    let mut submitted = Vec::new();
    for i in 0..12 {
        let mut body = task_body(&format!("t{i}"));
        body["env"] = json!({"PAYLOAD": "x".repeat(20 * 1024)});
        let (status, created) = api.submit(&key, &body).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        submitted.push(created["id"].as_str().unwrap().to_owned());
    }
    submitted.reverse();

    // Whole tasks: 12 × 20 KiB is several caps; the limit alone would allow one page.
    let pages = every_page(&api, &key, "/v1/tasks?view=full&limit=500").await;
    assert!(
        pages.len() >= 5,
        "the cap ends pages early: {} pages",
        pages.len()
    );
    let mut seen = Vec::new();
    for page in &pages {
        let items = page["items"].as_array().unwrap();
        assert!(!items.is_empty(), "a page holds at least one item");
        let bytes = serde_json::to_vec(items).unwrap().len();
        assert!(
            items.len() == 1 || bytes <= CAP,
            "{} items, {bytes} bytes",
            items.len()
        );
        seen.extend(items.iter().map(|t| t["id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(seen, submitted, "every task once, newest first");

    // A cap below one item: every page holds one, and none is skipped.
    let mut state = api.state.clone();
    state.list_page_max_bytes = 1;
    let api = TestApi {
        router: dispatcher::api::router(state.clone()),
        state,
        ..api
    };
    let pages = every_page(&api, &key, "/v1/tasks?limit=5").await;
    assert_eq!(pages.len(), submitted.len());
    let seen: Vec<String> = pages
        .iter()
        .map(|page| {
            let items = page["items"].as_array().unwrap();
            assert_eq!(items.len(), 1, "{page}");
            items[0]["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(seen, submitted);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len());
}
