//! The embedded default end to end: the `dispatcher` binary on an SQLite file with the
//! in-process queue and the local executor, driven over HTTP as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use testsupport::poll_until;

use crate::common::{
    LocalDispatcher, run_dispatcher, start_local_dispatcher, start_local_dispatcher_with,
};

pub(crate) struct Local(pub(crate) LocalDispatcher);

impl std::ops::Deref for Local {
    type Target = LocalDispatcher;
    fn deref(&self) -> &LocalDispatcher {
        &self.0
    }
}

impl Local {
    /// The embedded default: an SQLite file in the working folder. The dispatcher's own
    /// environment holds `DATABASE_URL`, which the tasks must not see.
    pub(crate) async fn start() -> Self {
        Self(start_local_dispatcher("sqlite://agent-bus.db").await)
    }

    pub(crate) async fn submit(&self, body: Value) -> String {
        self.submit_as(&self.key, &body).await
    }

    pub(crate) async fn read(&self, id: &str) -> Result<Value, String> {
        self.get(&format!("/v1/tasks/{id}")).await
    }

    /// `GET path` with the tenant's key, as JSON.
    pub(crate) async fn get(&self, path: &str) -> Result<Value, String> {
        self.get_as(&self.key, path).await
    }

    pub(crate) async fn wait_until_over(&self, id: &str) -> Value {
        poll_until(
            &format!("task {id} to finish"),
            Duration::from_secs(30),
            || async {
                let task = self.read(id).await?;
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
        let task = local.read(&cancelled).await?;
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

#[tokio::test]
async fn a_task_runs_through_the_runner_and_its_reports_reach_the_api() {
    let local = Local::start().await;
    // The workload speaks the runner's line protocol through $AGENT_BUS_REPORT_FILE.
    let script = r#"echo "progress 50 halfway there" >> "$AGENT_BUS_REPORT_FILE"
echo "usage model=gpt-4o calls=2 input_tokens=1000 output_tokens=200 cost_usd=0.02" >> "$AGENT_BUS_REPORT_FILE"
echo "usage model=gpt-4o calls=1 input_tokens=500 output_tokens=100 cost_usd=0.01" >> "$AGENT_BUS_REPORT_FILE"
echo "task $AGENT_BUS_TASK_ID attempt $AGENT_BUS_ATTEMPT token=${AGENT_BUS_REPORT_TOKEN:-hidden}"
"#;
    let reported = local
        .submit(json!({"name": "reported", "image": "unused", "command": ["sh", "-c", script]}))
        .await;
    let oom = local
        .submit(json!({"name": "cuda-oom", "image": "unused", "command": ["sh", "-c",
            "echo 'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB' >&2; exit 1"]}))
        .await;

    let task = local.wait_until_over(&reported).await;
    assert_eq!(task["state"], "succeeded", "{task}");
    let output = task["message"].as_str().unwrap();
    assert!(
        output.contains(&format!("task {reported} attempt 1 token=hidden")),
        "the command sees its task, never the report token: {output}"
    );
    let runner = poll_until("the runner's reports", Duration::from_secs(30), || async {
        let task = local.read(&reported).await?;
        let runner = task["runner"].clone();
        if runner["outcome"].is_object() && runner["usage"].is_array() {
            Ok(runner)
        } else {
            Err(task.to_string())
        }
    })
    .await;
    assert!(runner["started_at"].is_string(), "{runner}");
    assert_eq!(runner["progress"]["percent"], 50.0, "{runner}");
    assert_eq!(runner["progress"]["message"], "halfway there");
    assert_eq!(runner["usage"][0]["model"], "gpt-4o");
    assert_eq!(runner["usage"][0]["calls"], 3);
    assert_eq!(runner["usage"][0]["input_tokens"], 1500);
    assert!(
        (runner["usage_cost_usd"].as_f64().unwrap() - 0.03).abs() < 1e-9,
        "{runner}"
    );
    assert_eq!(runner["outcome"]["exit_code"], 0);
    assert_eq!(runner["outcome"]["source"], "runner");
    assert!(runner["outcome"]["failure_class"].is_null(), "{runner}");
    assert!(
        runner["gpus"].is_null(),
        "no GPU here, so no GPU figures: {runner}"
    );

    let task = local.wait_until_over(&oom).await;
    assert_eq!(
        (
            task["state"].as_str(),
            task["reason"].as_str(),
            task["exit_code"].as_i64()
        ),
        (Some("failed"), Some("gpu_out_of_memory"), Some(1)),
        "{task}"
    );
    assert_eq!(
        task["runner"]["outcome"]["failure_class"], "cuda_oom",
        "{task}"
    );
}

/// Queue TTL with no launcher at all (`--roles api,watcher`): a task that asks for one
/// second, and one that takes its tenant's default, both expire within the sweep's
/// second; a task without a TTL keeps waiting.
#[tokio::test]
async fn queued_tasks_expire_after_their_queue_ttl_without_a_launcher() {
    let local = Local(
        start_local_dispatcher_with("sqlite://agent-bus.db", &["--roles", "api,watcher"]).await,
    );
    let (set, _, stderr) = run_dispatcher(&local.dir, &["tenant", "queue-ttl", "acme", "1"]).await;
    assert!(set, "{stderr}");
    let asked = local
        .submit(
            json!({"name": "asked", "image": "busybox", "command": ["true"],
                       "queue_ttl_seconds": 1}),
        )
        .await;
    let defaulted = local
        .submit(json!({"name": "defaulted", "image": "busybox", "command": ["true"]}))
        .await;
    for id in [&asked, &defaulted] {
        let view = local.read(id).await.unwrap();
        let at = |field: &str| {
            view[field]
                .as_str()
                .unwrap_or_else(|| panic!("{field} in {view}"))
                .parse::<jiff::Timestamp>()
                .unwrap()
        };
        assert_eq!(
            at("expires_at").duration_since(at("created_at")),
            jiff::SignedDuration::from_secs(1),
            "{view}"
        );
        let expired = poll_until(
            &format!("task {id} to expire"),
            Duration::from_secs(15),
            || async {
                let task = local.read(id).await?;
                if task["state"] == "expired" {
                    Ok(task)
                } else {
                    Err(task.to_string())
                }
            },
        )
        .await;
        assert_eq!(expired["reason"], "queue_ttl", "{expired}");
        assert!(expired["finished_at"].is_string(), "{expired}");
    }
    assert_eq!(
        local.read(&asked).await.unwrap()["queue_ttl_seconds"],
        1,
        "the task's own TTL is part of its spec"
    );

    // Cleared, the default no longer applies: a new task waits (no launcher runs here).
    let (cleared, _, stderr) = run_dispatcher(&local.dir, &["tenant", "queue-ttl", "acme"]).await;
    assert!(cleared, "{stderr}");
    let waiting = local
        .submit(json!({"name": "waiting", "image": "busybox", "command": ["true"]}))
        .await;
    let view = local.read(&waiting).await.unwrap();
    assert!(view.get("expires_at").is_none(), "{view}");
}

#[tokio::test]
async fn a_queue_ttl_out_of_bounds_is_refused_naming_the_field() {
    let local = Local::start().await;
    let response = local
        .http
        .post(format!("{}/v1/tasks", local.base))
        .bearer_auth(&local.key)
        .json(
            &json!({"name": "t", "image": "busybox", "command": ["true"],
                      "queue_ttl_seconds": 0}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["field"], "queue_ttl_seconds", "{body}");
}
