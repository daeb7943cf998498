//! PostgreSQL goes away under a running dispatcher: submissions get a clear 503, nothing
//! is half-written, and service resumes by itself when the database returns. Runs on a
//! PostgreSQL server of its own, so the outage touches no other test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use testsupport::{PrivatePostgres, poll_until};

use crate::common::start_local_dispatcher;

#[tokio::test]
async fn a_database_outage_is_a_clear_503_and_service_resumes_after_it() {
    testsupport::needs_env!(PostgresBinaries);
    let postgres = PrivatePostgres::start();
    let dispatcher = start_local_dispatcher(&postgres.url()).await;
    let (http, base, key) = (
        dispatcher.http.clone(),
        dispatcher.base.clone(),
        dispatcher.key.clone(),
    );
    let submit = |name: &'static str| {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        async move {
            let response = http
                .post(format!("{base}/v1/tasks"))
                .bearer_auth(&key)
                .json(&json!({"name": name, "image": "unused", "command": ["true"]}))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            Ok::<_, String>((
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            ))
        }
    };
    assert_eq!(submit("before").await.unwrap().0, 201);

    postgres.stop();
    let (status, body) = submit("during").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(
        body["error"]["message"],
        "the database is unavailable; try again shortly"
    );
    // `/readyz` may answer from a check made before the outage for up to a second.
    poll_until("/readyz to say 503", Duration::from_secs(10), || async {
        let ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match ready.status().as_u16() {
            503 => Ok(()),
            other => Err(format!("{other}")),
        }
    })
    .await;

    postgres.start_again();
    let created = poll_until(
        "submissions to succeed again",
        Duration::from_mins(1),
        || async {
            match submit("after").await {
                Ok((201, task)) => Ok(task),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(created["state"], "queued");

    let list: Value = http
        .get(format!("{base}/v1/tasks"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["after", "before"],
        "the refused submission left nothing behind"
    );
}
