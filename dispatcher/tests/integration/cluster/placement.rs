//! Placement on the fake node pools: unschedulable pods, each class on its nodes, the
//! fallback from H100 to A100, and a GPU class's CPU and memory defaults.

use super::*;

#[tokio::test]
async fn a_pod_no_node_can_hold_shows_the_reason_unschedulable() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-stuck", |setup| async move {
        let key = setup.tenant("acme").await;
        // Every node has 64 CPUs; the per-task maximum (64 by default) is raised above
        // them, as an operator who misjudged the nodes would.
        let dispatcher = setup
            .start_with("dispatcher-under-test", &["--max-task-cpu", "1000"])
            .await;
        let body = json!({"name": "too-big", "image": "registry.invalid/x:1", "command": ["true"], "resources": {"cpu": "100"}});
        let (_, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        let id = task["id"].as_str().unwrap().to_owned();
        let stuck = poll_until("the unschedulable reason", CLUSTER_TIMEOUT, || async {
            let task = dispatcher.get(&key, &format!("/v1/tasks/{id}")).await;
            if task["reason"] == "unschedulable" { Ok(task) } else { Err(task.to_string()) }
        })
        .await;
        assert_eq!(stuck["state"], "launched", "waiting is not failing");
        assert!(stuck["message"].as_str().unwrap().contains("Insufficient cpu"), "{stuck}");
        let events = dispatcher.get(&key, &format!("/v1/tasks/{id}/events")).await;
        assert!(events["items"].as_array().unwrap().iter().any(|e| e["reason"] == "unschedulable"), "{events}");
    })
    .await;
}

/// The node the pod of `task_id`'s attempt `attempt` was bound to.
async fn node_of(ns: &TestNamespace, task_id: &str, attempt: u32) -> String {
    use k8s_openapi::api::core::v1::Pod;
    let simple = task_id.replace('-', "");
    let selector = format!("agent-bus.io/task-id={simple},agent-bus.io/attempt={attempt}");
    poll_until(
        &format!("the pod of {task_id} to be bound"),
        CLUSTER_TIMEOUT,
        || async {
            let pods = ns
                .api::<Pod>()
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| e.to_string())?;
            pods.items
                .iter()
                .find_map(|pod| pod.spec.as_ref()?.node_name.clone())
                .ok_or_else(|| format!("{} pods, none bound", pods.items.len()))
        },
    )
    .await
}

#[tokio::test]
async fn each_task_lands_on_a_node_of_its_class() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-placement", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        // (name, resources, the node-name prefix of the pool it must land in, workload)
        let cases = [
            ("cpu", json!({"cpu": "1", "memory": "1Gi"}), "cpu-", "cpu"),
            ("v100", json!({"memory": "8Gi", "gpu": {"count": 1, "class": "v100"}}), "gpu-v100-", "ml"),
            ("a100", json!({"memory": "32Gi", "gpu": {"count": 2, "class": "a100"}}), "gpu-a100-", "ml"),
            ("mig", json!({"gpu": {"count": 1, "class": "a100-mig-1g.10gb"}}), "gpu-a100-mig-", "ml"),
        ];
        let mut submitted = Vec::new();
        for (name, resources, pool, workload) in cases {
            let body = json!({"name": name, "image": "registry.invalid/x:1", "command": ["python", "run.py"], "resources": resources});
            let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
            assert_eq!(status, 201, "{task}");
            assert_eq!(task["workload"], workload, "{task}");
            submitted.push((task["id"].as_str().unwrap().to_owned(), name, pool));
        }
        for (id, name, pool) in &submitted {
            let task = dispatcher.wait_for_state(&key, id, &["succeeded", "failed"]).await;
            assert_eq!(task["state"], "succeeded", "{name}: {task}");
            let node = node_of(&setup.ns, id, 1).await;
            assert!(node.starts_with(pool), "{name} landed on {node}, not in {pool}*");
            if *name == "a100" {
                // The A100 pool, not the MIG node of the same accelerator.
                assert!(!node.starts_with("gpu-a100-mig-"), "{node}");
            }
            let job = &jobs_of(&setup.ns, id).await[0];
            let labels = job.metadata.labels.as_ref().unwrap();
            let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            assert_eq!(pod.init_containers.as_ref().unwrap()[0].name, "agent-bus-runner");
            assert_eq!(pod.containers[0].command.as_ref().unwrap()[0], "/agent-bus/bin/runner");
            let has_shm = pod.volumes.iter().flatten().any(|v| v.name == "dshm");
            assert_eq!(has_shm, labels["agent-bus.io/workload"] == "ml", "{name}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_task_falls_back_to_a100_while_the_h100_pool_is_full() {
    use k8s_openapi::api::core::v1::Pod;
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-fallback", |setup| async move {
        // Take every GPU of the one H100 node with a pod that runs for ten minutes.
        let filler: Pod = serde_json::from_value(json!({
            "metadata": {"name": "h100-filler", "annotations": {"agent-bus.io/test-run-seconds": "600"}},
            "spec": {
                "nodeSelector": {"accelerator": "nvidia-h100-80gb"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{"name": "hog", "image": "registry.invalid/hog:1",
                    "resources": {"requests": {"nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}}]
            }
        }))
        .unwrap();
        let pods = setup.ns.api::<Pod>();
        pods.create(&PostParams::default(), &filler).await.unwrap();
        poll_until("the filler pod to hold the H100 node", CLUSTER_TIMEOUT, || async {
            let pod = pods.get("h100-filler").await.map_err(|e| e.to_string())?;
            let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
            if phase == "Running" { Ok(()) } else { Err(phase) }
        })
        .await;

        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_with("fallback", &["--fallback-after", "2", "--keep-finished-jobs", "10m"]).await;
        let body = json!({"name": "big-train", "image": "registry.invalid/train:1", "command": ["torchrun", "train.py"],
            "resources": {"memory": "64Gi", "gpu": {"count": 8, "class": "h100"}}});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        assert_eq!(task["gpu_class"], "h100");
        let id = task["id"].as_str().unwrap().to_owned();
        let done = dispatcher.wait_for_state(&key, &id, &["succeeded", "failed"]).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["gpu_class"], "a100", "{done}");
        assert_eq!(done["attempt"], 2, "{done}");
        let node = node_of(&setup.ns, &id, 2).await;
        assert!(node.starts_with("gpu-a100-") && !node.starts_with("gpu-a100-mig-"), "{node}");
        let events = dispatcher.get(&key, &format!("/v1/tasks/{id}/events")).await;
        let fell_back = events["items"].as_array().unwrap().iter().find(|e| e["reason"] == "fell_back").cloned();
        let fell_back = fell_back.unwrap_or_else(|| panic!("no fell_back event: {events}"));
        assert!(fell_back["message"].as_str().unwrap().contains("no h100 node took the pod"), "{fell_back}");
        // The first attempt's Job is gone: one Job per task at a time.
        poll_until("the first attempt's job to be deleted", CLUSTER_TIMEOUT, || async {
            let names: Vec<String> = jobs_of(&setup.ns, &id).await.iter().filter(|j| j.metadata.deletion_timestamp.is_none()).filter_map(|j| j.metadata.name.clone()).collect();
            if names.len() == 1 && names[0].ends_with("-2") { Ok(()) } else { Err(format!("{names:?}")) }
        })
        .await;
        pods.delete("h100-filler", &DeleteParams::default()).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_gpu_task_without_cpu_or_memory_gets_its_classs_defaults_plus_shm() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-class-defaults", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let body = json!({"name": "finetune", "image": "registry.invalid/x:1", "command": ["python", "train.py"],
            "resources": {"gpu": {"count": 1, "class": "v100"}}, "shm": "2Gi"});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        // The estimate charges the class's 4 cores and 8Gi (0.04 and 0.005 per hour each)
        // besides the GPU (2.48), as the pod requests them.
        assert_eq!(task["cost_estimate"]["per_hour_dollars"], 2.68, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        // The Job as the API server stored it, and its pod bound to a V100 node.
        let node = node_of(&setup.ns, &id, 1).await;
        assert!(node.starts_with("gpu-v100-"), "{node}");
        let job = &jobs_of(&setup.ns, &id).await[0];
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let resources = pod.containers[0].resources.as_ref().unwrap();
        for side in [resources.requests.as_ref().unwrap(), resources.limits.as_ref().unwrap()] {
            assert_eq!(side["cpu"].0, "4", "{resources:?}");
            // 8Gi of the class plus the 2Gi /dev/shm, which is memory the pod uses.
            assert_eq!(side["memory"].0, "10Gi", "{resources:?}");
            assert_eq!(side["nvidia.com/gpu"].0, "1", "{resources:?}");
        }
        let task = dispatcher.wait_for_state(&key, &id, &["succeeded", "failed"]).await;
        assert_eq!(task["state"], "succeeded", "{task}");
    })
    .await;
}
