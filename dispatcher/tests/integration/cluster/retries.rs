//! Retries on the control plane: one Job per attempt, the next GPU class after a CUDA
//! OOM, another node after an Xid, and exactly one next attempt across a kill -9 during a
//! backoff. kwok fails pods with the exit code and the runner's termination message the
//! test annotations give (tests/env/kwok/pod-stages.yaml). The dispatchers keep finished
//! Jobs (`KEEP_JOBS`) so each attempt's Job can be read after the task ends.

use super::*;

/// The runner's termination summary of a command that failed with `class`.
fn runner_summary(class: &str, exit_code: i32) -> String {
    json!({"v": 1, "exit_code": exit_code, "failure_class": class, "duration_seconds": 1.0})
        .to_string()
}

/// The attempt label of each of `id`'s Jobs, sorted.
async fn attempts_of_jobs(ns: &TestNamespace, id: &str) -> Vec<String> {
    let mut attempts: Vec<String> = jobs_of(ns, id)
        .await
        .iter()
        .map(|job| job.metadata.labels.as_ref().unwrap()["agent-bus.io/attempt"].clone())
        .collect();
    attempts.sort();
    attempts
}

/// The pod spec of attempt `attempt`'s Job of task `id`.
async fn pod_spec_of_attempt(
    ns: &TestNamespace,
    id: &str,
    attempt: u32,
) -> k8s_openapi::api::core::v1::PodSpec {
    let jobs = jobs_of(ns, id).await;
    let job = jobs
        .iter()
        .find(|job| {
            job.metadata.labels.as_ref().unwrap()["agent-bus.io/attempt"] == attempt.to_string()
        })
        .unwrap_or_else(|| panic!("no job of attempt {attempt} among {}", jobs.len()));
    job.spec.clone().unwrap().template.spec.unwrap()
}

#[tokio::test]
async fn a_failing_task_is_retried_with_one_job_per_attempt() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-retry", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let body = json!({"name": "always-7", "image": "registry.invalid/x:1", "command": ["false"],
            "max_retries": 2, "retry_policy": {"backoff_seconds": 0},
            "annotations": {"agent-bus.io/test-exit-code": "7"}});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let done = dispatcher
            .wait_for_state(&key, &id, &["succeeded", "failed"])
            .await;
        assert_eq!(done["state"], "failed", "{done}");
        assert_eq!(done["attempt"], 3, "{done}");
        assert_eq!(done["exit_code"], 7, "{done}");
        let attempts = done["attempts"].as_array().unwrap();
        let actions: Vec<&str> = attempts
            .iter()
            .map(|a| a["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["retry", "retry", "fail"], "{done}");
        for attempt in attempts {
            assert!(attempt["node"].is_string(), "the node of {attempt}");
        }
        assert_eq!(attempts_of_jobs(&setup.ns, &id).await, ["1", "2", "3"]);
        assert_eq!(
            done["job"]["name"],
            format!("ab-{}-3", id.replace('-', "")),
            "{done}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_cuda_oom_is_retried_on_the_next_gpu_class() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-cuda-oom", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let body = json!({"name": "big-model", "image": "registry.invalid/x:1", "command": ["python"],
            "resources": {"gpu": {"count": 1, "class": "v100"}},
            "max_retries": 1, "retry_policy": {"backoff_seconds": 0},
            "annotations": {"agent-bus.io/test-exit-code": "1",
                            "agent-bus.io/test-termination-message": runner_summary("cuda_oom", 1)}});
        let (id, done) = run_to_end(&dispatcher, &key, &body).await;
        assert_eq!(done["state"], "failed", "{done}");
        assert_eq!(done["reason"], "gpu_out_of_memory", "{done}");
        let attempts = done["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{done}");
        assert_eq!(attempts[0]["failure_class"], "cuda_oom", "{done}");
        assert_eq!(attempts[0]["gpu_class"], "v100", "{done}");
        assert_eq!(attempts[0]["changes"], json!(["GPU class v100 → a100 (cuda_oom)"]), "{done}");
        assert_eq!(attempts[1]["gpu_class"], "a100", "{done}");
        let first = pod_spec_of_attempt(&setup.ns, &id, 1).await;
        let second = pod_spec_of_attempt(&setup.ns, &id, 2).await;
        assert_eq!(first.node_selector.unwrap()["accelerator"], "nvidia-tesla-v100");
        assert_eq!(second.node_selector.unwrap()["accelerator"], "nvidia-tesla-a100");
    })
    .await;
}

#[tokio::test]
async fn an_xid_failure_is_retried_on_another_node() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-xid", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let body = json!({"name": "xid", "image": "registry.invalid/x:1", "command": ["python"],
            "resources": {"gpu": {"count": 1, "class": "a100"}},
            "max_retries": 1, "retry_policy": {"backoff_seconds": 0},
            "annotations": {"agent-bus.io/test-exit-code": "1",
                            "agent-bus.io/test-termination-message": runner_summary("gpu_xid", 1)}});
        let (id, done) = run_to_end(&dispatcher, &key, &body).await;
        assert_eq!(done["state"], "failed", "{done}");
        let attempts = done["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{done}");
        assert_eq!(attempts[0]["failure_class"], "xid", "{done}");
        let failed_node = attempts[0]["node"].as_str().unwrap().to_owned();
        assert!(failed_node.starts_with("gpu-a100-"), "{done}");
        assert_eq!(attempts[0]["changes"], json!([format!("avoids node {failed_node} (xid)")]));
        assert_ne!(attempts[1]["node"], attempts[0]["node"], "{done}");
        assert!(attempts[1]["node"].as_str().unwrap().starts_with("gpu-a100-"), "{done}");
        let second = pod_spec_of_attempt(&setup.ns, &id, 2).await;
        let affinity = serde_json::to_value(second.affinity).unwrap();
        assert_eq!(
            affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchFields"][0]["values"],
            json!([failed_node])
        );
    })
    .await;
}

#[tokio::test]
async fn a_kill_during_a_backoff_still_gives_exactly_one_next_attempt() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-retry-kill", |setup| async move {
        let key = setup.tenant("acme").await;
        let mut first = setup.start_keeping_jobs().await;
        let body = json!({"name": "flaky", "image": "registry.invalid/x:1", "command": ["false"],
            "max_retries": 1, "retry_policy": {"backoff_seconds": 5},
            "annotations": {"agent-bus.io/test-exit-code": "1"}});
        let (status, task) = first.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let waiting = poll_until(
            "the first attempt to fail into its backoff",
            CLUSTER_TIMEOUT,
            || async {
                let task = first.get(&key, &format!("/v1/tasks/{id}")).await;
                if task["reason"] == "retrying" {
                    Ok(task)
                } else {
                    Err(task.to_string())
                }
            },
        )
        .await;
        assert_eq!(waiting["state"], "queued", "{waiting}");
        assert_eq!(waiting["attempt"], 2, "{waiting}");
        first.child.start_kill().unwrap();
        first.child.wait().await.unwrap();

        let second = setup.start_with("the-next-dispatcher", KEEP_JOBS).await;
        let done = second
            .wait_for_state(&key, &id, &["succeeded", "failed"])
            .await;
        assert_eq!(done["state"], "failed", "{done}");
        assert_eq!(done["attempt"], 2, "{done}");
        assert_eq!(attempts_of_jobs(&setup.ns, &id).await, ["1", "2"]);
        let events = second.get(&key, &format!("/v1/tasks/{id}/events")).await;
        let launches = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["to"] == "launching" && e["attempt"] == 2)
            .count();
        assert_eq!(launches, 1, "{events}");
    })
    .await;
}

#[tokio::test]
async fn an_evicted_pod_is_run_again_without_counting_a_retry() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::EvictParams;
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-evict", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let body = json!({"name": "evicted", "image": "registry.invalid/x:1", "command": ["sleep"],
            "max_retries": 0,
            "annotations": {"agent-bus.io/test-run-seconds": "6"}});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        dispatcher.wait_for_state(&key, &id, &["running"]).await;
        let pods: kube::Api<Pod> = setup.ns.api();
        let selector = format!("agent-bus.io/task-id={}", id.replace('-', ""));
        let first = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items
            .into_iter()
            .next()
            .expect("the attempt's pod");
        let first_name = first.metadata.name.clone().unwrap();
        // An eviction through the API marks the pod DisruptionTarget before deleting it.
        pods.evict(&first_name, &EvictParams::default())
            .await
            .unwrap();

        let done = dispatcher
            .wait_for_state(&key, &id, &["succeeded", "failed"])
            .await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["attempt"], 1, "{done}");
        assert_eq!(done["retries_used"], 0, "{done}");
        assert_eq!(attempts_of_jobs(&setup.ns, &id).await, ["1"]);
        let job = &jobs_of(&setup.ns, &id).await[0];
        let status = job.status.clone().unwrap();
        assert_eq!(status.succeeded, Some(1), "{status:?}");
        assert_eq!(
            status.failed.unwrap_or(0),
            0,
            "a disruption is not a failure: {status:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_oom_is_retried_with_more_memory() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-oom", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let body = json!({"name": "hungry", "image": "registry.invalid/x:1", "command": ["python"],
            "resources": {"cpu": "500m", "memory": "1Gi"},
            "max_retries": 1, "retry_policy": {"backoff_seconds": 0},
            "annotations": {"agent-bus.io/test-exit-code": "137",
                            "agent-bus.io/test-termination-message": runner_summary("host_oom", 137)}});
        let (id, done) = run_to_end(&dispatcher, &key, &body).await;
        assert_eq!(done["state"], "failed", "{done}");
        assert_eq!(done["reason"], "oom_killed", "{done}");
        let attempts = done["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{done}");
        assert_eq!(attempts[0]["failure_class"], "oom", "{done}");
        assert_eq!(attempts[0]["changes"], json!(["memory 1Gi → 1536Mi (oom, ×1.5)"]), "{done}");
        assert_eq!(done["resources"]["memory"], "1536Mi", "the spec the next attempt ran: {done}");
        let memory = |spec: k8s_openapi::api::core::v1::PodSpec| {
            let resources = spec.containers[0].resources.clone().unwrap();
            (
                resources.requests.unwrap()["memory"].0.clone(),
                resources.limits.unwrap()["memory"].0.clone(),
            )
        };
        assert_eq!(memory(pod_spec_of_attempt(&setup.ns, &id, 1).await), ("1Gi".to_owned(), "1Gi".to_owned()));
        assert_eq!(memory(pod_spec_of_attempt(&setup.ns, &id, 2).await), ("1536Mi".to_owned(), "1536Mi".to_owned()));
    })
    .await;
}

#[tokio::test]
async fn an_oom_of_a_gpu_task_without_memory_grows_its_classs_default() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-oom-default", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let body = json!({"name": "hungry-gpu", "image": "registry.invalid/x:1", "command": ["python"],
            "resources": {"gpu": {"count": 1, "class": "v100"}}, "shm": "1Gi",
            "max_retries": 1, "retry_policy": {"backoff_seconds": 0},
            "annotations": {"agent-bus.io/test-exit-code": "137",
                            "agent-bus.io/test-termination-message": runner_summary("host_oom", 137)}});
        let (id, done) = run_to_end(&dispatcher, &key, &body).await;
        assert_eq!(done["reason"], "oom_killed", "{done}");
        let attempts = done["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{done}");
        // The class's 8Gi was what the pod had (the effective figure), so it grows.
        assert_eq!(attempts[0]["changes"], json!(["memory 8Gi → 12Gi (oom, ×1.5)"]), "{done}");
        let memory = |spec: k8s_openapi::api::core::v1::PodSpec| {
            let resources = spec.containers[0].resources.clone().unwrap();
            resources.requests.unwrap()["memory"].0.clone()
        };
        // Each attempt's memory plus its 1Gi /dev/shm.
        assert_eq!(memory(pod_spec_of_attempt(&setup.ns, &id, 1).await), "9Gi");
        assert_eq!(memory(pod_spec_of_attempt(&setup.ns, &id, 2).await), "13Gi");
    })
    .await;
}

/// Submits `body` as `key` and waits until its task has succeeded or failed: its id and
/// its final view.
async fn run_to_end(dispatcher: &Dispatcher, key: &str, body: &Value) -> (String, Value) {
    let (status, task) = dispatcher.post(key, "/v1/tasks", body, None).await;
    assert_eq!(status, 201, "{task}");
    let id = task["id"].as_str().unwrap().to_owned();
    let done = dispatcher
        .wait_for_state(key, &id, &["succeeded", "failed"])
        .await;
    (id, done)
}
