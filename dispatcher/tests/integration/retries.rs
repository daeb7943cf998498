//! Retries end to end in the embedded default (the `dispatcher` binary, SQLite, the local
//! executor): a failed attempt becomes a new attempt after its backoff, as the task's
//! retry policy says, and the attempt list tells what happened.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use testsupport::poll_until;

use crate::local::Local;

impl Local {
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn wait_for(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        poll_until(
            &format!("task {id}: {what}"),
            Duration::from_mins(1),
            || async {
                let task = self.read(id).await?;
                if done(&task) {
                    Ok(task)
                } else {
                    Err(task.to_string())
                }
            },
        )
        .await
    }
}

fn attempts(task: &Value) -> &Vec<Value> {
    task["attempts"].as_array().unwrap()
}

#[tokio::test]
async fn a_task_always_exiting_7_with_two_retries_fails_at_attempt_3() {
    let local = Local::start().await;
    let id = local
        .submit(
            json!({"name": "always-7", "image": "busybox", "command": ["sh", "-c", "exit 7"],
                       "max_retries": 2, "retry_policy": {"backoff_seconds": 0}}),
        )
        .await;
    let task = local.wait_until_over(&id).await;
    assert_eq!(task["state"], "failed", "{task}");
    assert_eq!(task["attempt"], 3, "{task}");
    assert_eq!(task["retries_used"], 2, "{task}");
    assert_eq!(task["exit_code"], 7, "{task}");
    let attempts = attempts(&task);
    assert_eq!(attempts.len(), 3, "{task}");
    for (index, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt["attempt"], index + 1, "{attempt}");
        assert_eq!(attempt["outcome"], "failed", "{attempt}");
        assert_eq!(attempt["failure_class"], "exit_code", "{attempt}");
        assert_eq!(attempt["exit_code"], 7, "{attempt}");
        assert!(attempt["ended_at"].is_string(), "{attempt}");
    }
    assert_eq!(attempts[0]["action"], "retry");
    assert!(
        attempts[0]["decision"]
            .as_str()
            .unwrap()
            .starts_with("retry 1 of 2"),
        "{task}"
    );
    assert_eq!(attempts[2]["action"], "fail");
    assert_eq!(
        attempts[2]["decision"], "not retried: no retries left (max_retries 2)",
        "{task}"
    );

    // The events carry the attempt: each attempt ran, failed and (but the last) queued
    // the next.
    let events = local.get(&format!("/v1/tasks/{id}/events")).await.unwrap();
    let events = events["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{events}"));
    let retried: Vec<u64> = events
        .iter()
        .filter(|e| e["to"] == "queued" && e["reason"] == "retrying")
        .map(|e| e["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(retried, [2, 3], "{events:?}");
    let running: Vec<u64> = events
        .iter()
        .filter(|e| e["to"] == "running")
        .map(|e| e["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(running, [1, 2, 3], "{events:?}");
}

#[tokio::test]
async fn a_flaky_task_succeeds_at_its_second_attempt() {
    let local = Local::start().await;
    // Fails the first time (it leaves a marker named after its task in the shared temp
    // folder: its tenant's folder, above its attempt's, is not its to write), succeeds
    // the next.
    let id = local
        .submit(json!({"name": "flaky", "image": "busybox",
                       "command": ["sh", "-c", "cd /; m=/tmp/ran-once-$AGENT_BUS_TASK_ID; if [ -f \"$m\" ]; then rm -f \"$m\"; exit 0; fi; touch \"$m\" || exit 9; exit 1"],
                       "max_retries": 3, "retry_policy": {"backoff_seconds": 1}}))
        .await;
    let task = local.wait_until_over(&id).await;
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(task["attempt"], 2, "{task}");
    assert_eq!(task["retries_used"], 1, "{task}");
    let attempts = attempts(&task);
    assert_eq!(attempts.len(), 2, "{task}");
    assert_eq!(attempts[0]["outcome"], "failed");
    assert_eq!(attempts[0]["exit_code"], 1);
    assert_eq!(attempts[1]["outcome"], "succeeded");
    assert!(attempts[1].get("action").is_none(), "{task}");
    // The backoff was waited out: the second attempt started at least half a second
    // (the jittered floor of 1 s) after the first ended.
    let at = |value: &Value| value.as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
    let waited = at(&attempts[1]["started_at"]).duration_since(at(&attempts[0]["ended_at"]));
    assert!(
        waited >= jiff::SignedDuration::from_millis(500),
        "{waited:?} {task}"
    );
}

#[tokio::test]
async fn a_fail_rule_on_exit_code_3_stops_at_the_first_attempt() {
    let local = Local::start().await;
    let id = local
        .submit(
            json!({"name": "bad-input", "image": "busybox", "command": ["sh", "-c", "exit 3"],
                       "max_retries": 3,
                       "retry_policy": {"backoff_seconds": 0, "rules": [
                           {"action": "fail", "on_exit_codes": [2, 3]}]}}),
        )
        .await;
    let task = local.wait_until_over(&id).await;
    assert_eq!(task["state"], "failed", "{task}");
    assert_eq!(task["attempt"], 1, "{task}");
    assert_eq!(task["retries_used"], 0, "{task}");
    let attempts = attempts(&task);
    assert_eq!(attempts.len(), 1, "{task}");
    assert_eq!(attempts[0]["action"], "fail");
    assert_eq!(
        attempts[0]["decision"], "not retried: retry_policy.rules[0] fails on exit_code",
        "{task}"
    );
}

#[tokio::test]
async fn cancel_during_a_backoff_ends_the_task_and_no_attempt_follows() {
    let local = Local::start().await;
    let id = local
        .submit(
            json!({"name": "backing-off", "image": "busybox", "command": ["sh", "-c", "exit 1"],
                       "max_retries": 2, "retry_policy": {"backoff_seconds": 4}}),
        )
        .await;
    let waiting = local
        .wait_for(&id, "waiting out its backoff", |task| {
            task["state"] == "queued" && task["reason"] == "retrying"
        })
        .await;
    assert_eq!(waiting["attempt"], 2, "{waiting}");
    let next_at: jiff::Timestamp = waiting["next_attempt_at"]
        .as_str()
        .unwrap_or_else(|| panic!("next_attempt_at in {waiting}"))
        .parse()
        .unwrap();
    assert!(
        waiting["message"]
            .as_str()
            .unwrap()
            .starts_with("attempt 1 failed (exit_code, exit code 1); attempt 2 starts after"),
        "{waiting}"
    );
    let (status, cancelled) = local
        .post(&format!("/v1/tasks/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");

    // Past the end of the backoff (plus the launcher's one-second release tick), it is
    // still cancelled at attempt 2, with only the first attempt in its list.
    let after = next_at + jiff::SignedDuration::from_secs(3);
    let settled = local
        .wait_for(&id, "the backoff to be long over", |_| {
            jiff::Timestamp::now() > after
        })
        .await;
    assert_eq!(settled["state"], "cancelled", "{settled}");
    assert_eq!(settled["attempt"], 2, "{settled}");
    assert_eq!(attempts(&settled).len(), 1, "{settled}");
    assert!(settled.get("next_attempt_at").is_none(), "{settled}");
}

#[tokio::test]
async fn bad_retry_policies_are_refused_naming_the_field() {
    let local = Local::start().await;
    let base = json!({"name": "t", "image": "busybox", "command": ["true"]});
    let cases = [
        (
            json!({"backoff_seconds": -5}),
            "retry_policy.backoff_seconds",
        ),
        (
            json!({"backoff_seconds": 100_000}),
            "retry_policy.backoff_seconds",
        ),
        (
            json!({"rules": [{"action": "retry_forever"}]}),
            "retry_policy.rules[0].action",
        ),
        (
            json!({"rules": [{"action": "retry", "on_failure_classes": ["oom", "gremlins"]}]}),
            "retry_policy.rules[0].on_failure_classes[1]",
        ),
        (
            json!({"rules": [{"action": "retry", "mutate": {"memory_factor": 0.5}}]}),
            "retry_policy.rules[0].mutate.memory_factor",
        ),
        (
            json!({"rules": vec![json!({"action": "retry"}); 17]}),
            "retry_policy.rules",
        ),
        (json!({"colour": "red"}), "retry_policy"),
    ];
    for (policy, field) in cases {
        let mut body = base.clone();
        body["retry_policy"] = policy.clone();
        let (status, answer) = local.post("/v1/tasks", &body).await;
        assert_eq!(status, 422, "{policy}: {answer}");
        let named = answer["error"]["field"].as_str().unwrap_or_default();
        assert!(named.starts_with(field), "{policy}: {answer}");
    }
}
