//! Task output on the control plane: kwok pods run no process, so the test posts the
//! lines as the runner in the pod would (its `/logs` route, the attempt's report token),
//! then the Job is deleted and the dispatcher restarted, and the lines are still there.

use super::*;

const REPORT_SECRET: &str = "cluster logs test report secret, 32+ chars";

#[tokio::test]
async fn lines_outlive_the_job_and_a_dispatcher_restart() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-logs", |setup| async move {
        let key = setup.tenant("acme").await;
        let flags = ["--report-secret", REPORT_SECRET];
        let mut dispatcher = setup.start_with("dispatcher-under-test", &flags).await;
        let body = json!({"name": "talk", "image": "registry.invalid/x:1", "command": ["sh", "-c", "echo hi"],
            "annotations": {"agent-bus.io/test-run-seconds": "3"}});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();

        // The runner's batches: stdout and stderr interleaved, in the order it read them.
        let tokens = dispatcher::report::ReportTokens::new(REPORT_SECRET.as_bytes());
        let token = tokens.mint(
            id.parse().unwrap(),
            1,
            jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
        );
        let url = format!("{}/internal/v1/tasks/{id}/attempts/1/logs", dispatcher.base);
        for lines in [
            json!([{"sequence": 1, "stream": "stdout", "time": "2026-12-02T10:00:00Z", "line": "loading"},
                   {"sequence": 2, "stream": "stderr", "time": "2026-12-02T10:00:01Z", "line": "warning: slow disk"}]),
            json!([{"sequence": 3, "stream": "stdout", "time": "2026-12-02T10:00:02Z", "line": "done"}]),
        ] {
            let response = dispatcher
                .http
                .post(&url)
                .bearer_auth(&token)
                .json(&json!({ "lines": lines }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        }
        let done = dispatcher.wait_for_state(&key, &id, &["succeeded", "failed"]).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        // The outcome recorded, the watcher deletes the Job (--keep-finished-jobs 0).
        poll_until("the job to be deleted", CLUSTER_TIMEOUT, || async {
            let jobs = jobs_of(&setup.ns, &id).await;
            if jobs.is_empty() { Ok(()) } else { Err(format!("{} jobs", jobs.len())) }
        })
        .await;
        dispatcher.kill();
        let _ = dispatcher.child.wait().await;

        let dispatcher = setup.start_with("dispatcher-under-test", &flags).await;
        let read = |query: &'static str| {
            let dispatcher = &dispatcher;
            let (id, key) = (id.clone(), key.clone());
            async move {
                let response = dispatcher
                    .http
                    .get(format!("{}/v1/tasks/{id}/logs{query}", dispatcher.base))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.text().await.unwrap()
            }
        };
        assert_eq!(read("").await, "loading\nwarning: slow disk\ndone\n");
        assert_eq!(
            read("?timestamps=true&tail=2").await,
            "2026-12-02T10:00:01Z stderr warning: slow disk\n2026-12-02T10:00:02Z stdout done\n"
        );
        assert_eq!(read("?follow=true").await, "loading\nwarning: slow disk\ndone\n");
        // The attempt is over: later lines are refused once its end allowance passed, and
        // another tenant sees no such task.
        let other = setup.tenant("globex").await;
        let response = dispatcher
            .http
            .get(format!("{}/v1/tasks/{id}/logs", dispatcher.base))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
    })
    .await;
}
