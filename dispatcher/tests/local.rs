//! The embedded default end to end: the `dispatcher` binary on an SQLite file with the
//! in-process queue and the local executor, driven over HTTP as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use testsupport::poll_until;

mod common;
use common::{LocalDispatcher, start_local_dispatcher};

struct Local(LocalDispatcher);

impl std::ops::Deref for Local {
    type Target = LocalDispatcher;
    fn deref(&self) -> &LocalDispatcher {
        &self.0
    }
}

impl Local {
    /// The embedded default: an SQLite file in the working folder. The dispatcher's own
    /// environment holds `DATABASE_URL`, which the tasks must not see.
    async fn start() -> Self {
        Self(start_local_dispatcher("sqlite://agent-bus.db").await)
    }

    async fn submit(&self, body: Value) -> String {
        let response = self
            .http
            .post(format!("{}/v1/tasks", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn wait_until_over(&self, id: &str) -> Value {
        poll_until(
            &format!("task {id} to finish"),
            Duration::from_secs(30),
            || async {
                let task: Value = self
                    .http
                    .get(format!("{}/v1/tasks/{id}", self.base))
                    .bearer_auth(&self.key)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                if ["succeeded", "failed", "cancelled", "timed_out"]
                    .contains(&task["state"].as_str().unwrap_or_default())
                {
                    Ok(task)
                } else {
                    Err(task.to_string())
                }
            },
        )
        .await
    }
}

#[tokio::test]
async fn the_embedded_default_runs_tasks_as_processes() {
    let local = Local::start().await;
    assert!(
        local.dir.join("agent-bus.db").exists(),
        "state lives in an SQLite file in the working directory"
    );

    let ok = local.submit(json!({"name": "hello", "image": "unused", "command": ["sh", "-c", "echo hello $WHO"], "env": {"WHO": "world"}})).await;
    let failing = local.submit(json!({"name": "fails", "image": "unused", "command": ["sh", "-c", "echo boom >&2; exit 3"]})).await;
    let slow = local.submit(json!({"name": "slow", "image": "unused", "command": ["sleep", "30"], "timeout_seconds": 1})).await;
    let cancelled = local
        .submit(json!({"name": "cancel-me", "image": "unused", "command": ["sleep", "30"]}))
        .await;
    let secret = local.submit(json!({"name": "env", "image": "unused", "command": ["sh", "-c", "echo db=${DATABASE_URL:-unset}"]})).await;

    let task = local.wait_until_over(&ok).await;
    assert_eq!(
        (task["state"].as_str(), task["exit_code"].as_i64()),
        (Some("succeeded"), Some(0))
    );
    assert_eq!(task["message"], "hello world\n");

    let task = local.wait_until_over(&failing).await;
    assert_eq!(
        (
            task["state"].as_str(),
            task["reason"].as_str(),
            task["exit_code"].as_i64()
        ),
        (Some("failed"), Some("exit_code"), Some(3))
    );
    assert_eq!(
        task["message"], "boom\n",
        "the tail of the output explains the failure"
    );

    let task = local.wait_until_over(&slow).await;
    assert_eq!(
        (task["state"].as_str(), task["reason"].as_str()),
        (Some("timed_out"), Some("deadline_exceeded"))
    );

    poll_until("the long task to run", Duration::from_secs(30), || async {
        let task: Value = local
            .http
            .get(format!("{}/v1/tasks/{cancelled}", local.base))
            .bearer_auth(&local.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if task["state"] == "running" {
            Ok(())
        } else {
            Err(task.to_string())
        }
    })
    .await;
    let response = local
        .http
        .post(format!("{}/v1/tasks/{cancelled}/cancel", local.base))
        .bearer_auth(&local.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let task = local.wait_until_over(&cancelled).await;
    assert_eq!(task["state"], "cancelled");

    let task = local.wait_until_over(&secret).await;
    assert_eq!(
        task["message"], "db=unset\n",
        "tasks never see the dispatcher's environment"
    );
}
