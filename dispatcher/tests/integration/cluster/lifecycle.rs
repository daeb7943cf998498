//! A task's life on the cluster: one labelled Job that succeeds, a failing pod's exit
//! code, cancelling, fifty concurrent submits with one key, and a silent runner.

use super::*;

#[tokio::test]
async fn a_task_becomes_one_labelled_job_and_succeeds() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-success", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let body = json!({"name": "train", "image": "registry.invalid/train:1", "command": ["python", "train.py"],
            "resources": {"cpu": "1", "memory": "2Gi", "gpu": {"count": 1, "class": "a100"}}, "queue": "gpu", "labels": {"example.com/team": "vision"}});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let done = dispatcher.wait_for_state(&key, &id, &["succeeded", "failed"]).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["exit_code"], 0);

        let jobs = jobs_of(&setup.ns, &id).await;
        assert_eq!(jobs.len(), 1);
        let job = &jobs[0];
        let labels = job.metadata.labels.clone().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "agent-bus");
        assert_eq!(labels["agent-bus.io/tenant"], "acme");
        assert_eq!(labels["agent-bus.io/queue"], "gpu");
        assert_eq!(labels["agent-bus.io/attempt"], "1");
        assert_eq!(labels["example.com/team"], "vision");
        assert_eq!(done["job"]["name"], job.metadata.name.clone().unwrap());
        let pod_spec = job.spec.clone().unwrap().template.spec.unwrap();
        assert_eq!(pod_spec.node_selector.unwrap()["accelerator"], "nvidia-tesla-a100");
        assert_eq!(pod_spec.restart_policy.as_deref(), Some("Never"));

        let events = dispatcher.get(&key, &format!("/v1/tasks/{id}/events")).await;
        let history: Vec<&str> = events["items"].as_array().unwrap().iter().map(|e| e["to"].as_str().unwrap()).collect();
        assert_eq!(history.first(), Some(&"queued"));
        assert_eq!(history.last(), Some(&"succeeded"));
        assert!(history.contains(&"launched"), "{history:?}");
    })
    .await;
}

#[tokio::test]
async fn a_failing_pod_fails_the_task_with_its_exit_code() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-exit", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
        // kwok fails the pod with this exit code (tests/env/kwok/pod-stages.yaml).
        let body = json!({"name": "crash", "image": "registry.invalid/x:1", "command": ["false"],
            "annotations": {"agent-bus.io/test-exit-code": "3"}});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let done = dispatcher
            .wait_for_state(&key, &id, &["succeeded", "failed", "timed_out"])
            .await;
        assert_eq!(done["state"], "failed", "{done}");
        assert_eq!(done["reason"], "exit_code");
        assert_eq!(done["exit_code"], 3);
    })
    .await;
}

#[tokio::test]
async fn cancelling_a_running_task_deletes_its_job() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-cancel", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
        let body = json!({"name": "long", "image": "registry.invalid/x:1", "command": ["sleep", "600"],
            "annotations": {"agent-bus.io/test-run-seconds": "600"}});
        let (_, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        let id = task["id"].as_str().unwrap().to_owned();
        let _ = dispatcher.wait_for_state(&key, &id, &["launched", "running", "succeeded"]).await;
        let (status, cancelled) = dispatcher.post(&key, &format!("/v1/tasks/{id}/cancel"), &json!({}), None).await;
        assert_eq!(status, 200, "{cancelled}");
        assert_eq!(cancelled["state"], "cancelled");
        poll_until("the job to be deleted", CLUSTER_TIMEOUT, || async {
            let jobs = jobs_of(&setup.ns, &id).await;
            if jobs.is_empty() { Ok(()) } else { Err(format!("{} jobs", jobs.len())) }
        })
        .await;
        let still = dispatcher.get(&key, &format!("/v1/tasks/{id}")).await;
        assert_eq!(still["state"], "cancelled", "the watcher does not resurrect a cancelled task");
    })
    .await;
}

#[tokio::test]
async fn fifty_concurrent_submits_with_one_key_make_one_task_and_one_job() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-idem", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let body = json!({"name": "once", "image": "registry.invalid/x:1", "command": ["true"]});
        let responses = futures::future::join_all(
            (0..50).map(|_| dispatcher.post(&key, "/v1/tasks", &body, Some("same-key"))),
        )
        .await;
        let ids: HashSet<String> = responses
            .iter()
            .map(|(status, task)| {
                assert!(*status == 201 || *status == 200, "{status}: {task}");
                task["id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(ids.len(), 1);
        let id = ids.into_iter().next().unwrap();
        dispatcher.wait_for_state(&key, &id, &["succeeded"]).await;
        assert_eq!(jobs_of(&setup.ns, &id).await.len(), 1);
        let all = setup
            .ns
            .api::<Job>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        assert_eq!(all.len(), 1, "exactly one Job in the namespace");
    })
    .await;
}

#[tokio::test]
async fn a_running_task_whose_runner_is_silent_fails_with_heartbeat_lost() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-heartbeat", |setup| async move {
        let key = setup.tenant("acme").await;
        // kwok runs no containers, so no runner ever reports: exactly a silent runner.
        let dispatcher = setup
            .start_with(
                "heartbeat",
                &["--report-url", "http://127.0.0.1:9", "--heartbeat-timeout", "2", "--fail-on-heartbeat-lost"],
            )
            .await;
        let body = json!({"name": "silent", "image": "registry.invalid/x:1", "command": ["sleep", "600"],
            "annotations": {"agent-bus.io/test-run-seconds": "600"}});
        let (_, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        let id = task["id"].as_str().unwrap().to_owned();
        let env = poll_until("the job", CLUSTER_TIMEOUT, || async {
            let jobs = jobs_of(&setup.ns, &id).await;
            jobs.first().map(|j| j.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].env.clone().unwrap_or_default()).ok_or_else(|| "no job yet".to_owned())
        })
        .await;
        let url = env.iter().find(|e| e.name == "AGENT_BUS_REPORT_URL").and_then(|e| e.value.clone()).unwrap();
        assert_eq!(url, format!("http://127.0.0.1:9/internal/v1/tasks/{id}/attempts/1/reports"));
        assert!(env.iter().any(|e| e.name == "AGENT_BUS_REPORT_TOKEN"));
        let failed = dispatcher.wait_for_state(&key, &id, &["failed", "succeeded"]).await;
        assert_eq!(failed["state"], "failed", "{failed}");
        assert_eq!(failed["reason"], "heartbeat_lost", "{failed}");
        poll_until("the silent task's job to be deleted", CLUSTER_TIMEOUT, || async {
            let live = jobs_of(&setup.ns, &id).await.iter().filter(|j| j.metadata.deletion_timestamp.is_none()).count();
            if live == 0 { Ok(()) } else { Err(format!("{live} live jobs")) }
        })
        .await;
    })
    .await;
}
