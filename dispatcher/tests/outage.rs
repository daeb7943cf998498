//! PostgreSQL goes away under a running dispatcher: submissions get a clear 503, nothing
//! is half-written, and service resumes by itself when the database returns. Runs on a
//! PostgreSQL server of its own, so the outage touches no other test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use testsupport::{PrivatePostgres, poll_until};

#[tokio::test]
async fn a_database_outage_is_a_clear_503_and_service_resumes_after_it() {
    let postgres = PrivatePostgres::start();
    let dir = std::env::temp_dir().join(format!(
        "agent-bus-outage-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let command = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"));
        command
            .args(args)
            .current_dir(&dir)
            .env("AGENT_BUS_LOG", "warn")
            .env("DATABASE_URL", postgres.url())
            .env_remove("REDIS_URL")
            .env_remove("KUBECONFIG");
        command
    };
    let output = command(&["tenant", "create", "acme"])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _dispatcher = command(&[
        "serve",
        "--executor",
        "local",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .stdout(Stdio::inherit())
    .stderr(Stdio::inherit())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
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
    poll_until(
        "the dispatcher to be ready",
        Duration::from_secs(30),
        || async {
            match http.get(format!("{base}/readyz")).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(submit("before").await.unwrap().0, 201);

    postgres.stop();
    let (status, body) = submit("during").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(
        body["error"]["message"],
        "the database is unavailable; try again shortly"
    );
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);

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
