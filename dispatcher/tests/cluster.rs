//! End to end on the real test environment: the `dispatcher` binary against PostgreSQL,
//! Redis and the Kubernetes control plane with kwok nodes. Each test gets its own
//! namespace, database and Redis key space, and its own dispatcher process(es).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::process::Stdio;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use testsupport::{
    CLUSTER_TIMEOUT, RedisKeySpace, TestDatabase, TestNamespace, poll_until, with_database,
    with_namespace, with_redis_keyspace,
};

/// A dispatcher process under test.
struct Dispatcher {
    child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

/// What one test runs on: its namespace, database and Redis key space.
struct Setup {
    ns: TestNamespace,
    db: TestDatabase,
    redis: RedisKeySpace,
}

impl Setup {
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"));
        command
            .args(args)
            .env("DATABASE_URL", &self.db.url)
            .env("REDIS_URL", &self.redis.url)
            .env("AGENT_BUS_REDIS_PREFIX", &self.redis.prefix)
            .env("AGENT_BUS_NAMESPACE", &self.ns.name)
            .env("AGENT_BUS_LOG", "warn")
            .env("AGENT_BUS_ALLOW_ANNOTATION_PREFIXES", "agent-bus.io/test-")
            .env("AGENT_BUS_UNSCHEDULABLE_AFTER", "1")
            .kill_on_drop(true);
        command
    }

    async fn tenant(&self, name: &str) -> String {
        let output = self
            .command(&["tenant", "create", name])
            .stderr(Stdio::inherit())
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    async fn start(&self) -> Dispatcher {
        self.start_as("dispatcher-under-test").await
    }

    /// Starts a dispatcher whose queue consumer and lease identity is `instance`.
    async fn start_as(&self, instance: &str) -> Dispatcher {
        self.start_with(instance, &[]).await
    }

    /// Starts a dispatcher with `extra` flags.
    async fn start_with(&self, instance: &str, extra: &[&str]) -> Dispatcher {
        let port = testsupport::free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "serve",
            "--executor",
            "kubernetes",
            "--listen",
            &listen,
            "--reconcile-interval",
            "1",
            "--launching-stale-after",
            "2",
        ];
        args.extend_from_slice(extra);
        let child = self
            .command(&args)
            .env("AGENT_BUS_INSTANCE", instance)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let dispatcher = Dispatcher {
            child,
            base: format!("http://{listen}"),
            http: reqwest::Client::new(),
        };
        poll_until("the dispatcher to be ready", CLUSTER_TIMEOUT, || async {
            match dispatcher
                .http
                .get(format!("{}/readyz", dispatcher.base))
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => Ok(()),
                Ok(response) => Err(format!("{}", response.status())),
                Err(error) => Err(error.to_string()),
            }
        })
        .await;
        dispatcher
    }
}

impl Dispatcher {
    async fn post(
        &self,
        key: &str,
        path: &str,
        body: &Value,
        idempotency: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(body);
        if let Some(idempotency) = idempotency {
            request = request.header("idempotency-key", idempotency);
        }
        let response = request.send().await.unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    async fn get(&self, key: &str, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_for_state(&self, key: &str, id: &str, states: &[&str]) -> Value {
        poll_until(
            &format!("task {id} to reach {states:?}"),
            CLUSTER_TIMEOUT,
            || async {
                let task = self.get(key, &format!("/v1/tasks/{id}")).await;
                if states.contains(&task["state"].as_str().unwrap_or_default()) {
                    Ok(task)
                } else {
                    Err(task.to_string())
                }
            },
        )
        .await
    }

    fn kill(&mut self) {
        // SIGKILL: no shutdown code runs, as in a crash.
        let _ = self.child.start_kill();
    }
}

/// Runs `body` with a namespace, a database and a Redis key space.
async fn with_environment<F, Fut>(prefix: &str, body: F)
where
    F: FnOnce(Setup) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    with_namespace(prefix, |ns| async move {
        with_database(|db| async move {
            with_redis_keyspace(|redis| async move { body(Setup { ns, db, redis }).await }).await;
        })
        .await;
    })
    .await;
}

async fn jobs_of(ns: &TestNamespace, task_id: &str) -> Vec<Job> {
    let simple = task_id.replace('-', "");
    ns.api::<Job>()
        .list(&ListParams::default().labels(&format!("agent-bus.io/task-id={simple}")))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn a_task_becomes_one_labelled_job_and_succeeds() {
    with_environment("e2e-success", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
        let body = json!({"name": "train", "image": "registry.invalid/train:1", "command": ["python", "train.py"],
            "resources": {"cpu": "1", "memory": "2Gi", "gpu": {"count": 1, "class": "a100"}}, "queue": "gpu", "labels": {"team": "vision"}});
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
        assert_eq!(labels["team"], "vision");
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
    with_environment("e2e-idem", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
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
async fn crashes_between_claim_and_create_and_after_create_leave_one_job_per_task() {
    with_environment("e2e-crash", |setup| async move {
        let key = setup.tenant("acme").await;
        let mut first = setup.start().await;
        let body = json!({"name": "crashy", "image": "registry.invalid/x:1", "command": ["true"]});
        let mut ids = Vec::new();
        for _ in 0..20 {
            let (status, task) = first.post(&key, "/v1/tasks", &body, None).await;
            assert_eq!(status, 201);
            ids.push(task["id"].as_str().unwrap().to_owned());
        }
        // kill -9 while launches are in flight: some tasks are claimed, some created.
        first.kill();
        let _ = first.child.wait().await;

        // A claim whose launcher died before creating anything, and one that died right
        // after creating its Job, made explicitly so both cases are always exercised.
        let store = dispatcher::store::Store::connect(&setup.db.url, 2)
            .await
            .unwrap();
        let claim = |id: &str| {
            let store = store.clone();
            let id: dispatcher::task::TaskId = id.parse().unwrap();
            async move {
                use dispatcher::store::Transition;
                use dispatcher::task::TaskState;
                store
                    .transition(id, TaskState::Queued, &Transition::to(TaskState::Launching))
                    .await
                    .unwrap()
            }
        };
        let before_create = stored_queued_task(&store, &body).await;
        claim(&before_create).await.unwrap();
        let after_create = stored_queued_task(&store, &body).await;
        let created = claim(&after_create).await.unwrap();
        let job = dispatcher::launcher::job_spec::build_job(
            &created,
            &dispatcher::launcher::job_spec::LaunchConfig {
                namespace: setup.ns.name.clone(),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        setup
            .ns
            .api::<Job>()
            .create(&PostParams::default(), &job)
            .await
            .unwrap();
        ids.push(before_create);
        ids.push(after_create);

        let second = setup.start().await;
        for id in &ids {
            let task = second
                .wait_for_state(&key, id, &["succeeded", "failed"])
                .await;
            assert_eq!(task["state"], "succeeded", "{task}");
            assert_eq!(jobs_of(&setup.ns, id).await.len(), 1, "task {id}");
        }
        let all = setup
            .ns
            .api::<Job>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        assert_eq!(all.len(), ids.len(), "one Job per task, no more");
    })
    .await;
}

/// Stores a queued task of tenant `acme` directly, as the API would, while no
/// dispatcher runs (so nothing enqueues it: the reconciler must find it).
async fn stored_queued_task(store: &dispatcher::store::Store, body: &Value) -> String {
    use dispatcher::task::{Task, submission};
    let spec = submission::validate(
        serde_json::from_value(body.clone()).unwrap(),
        &submission::Limits::default(),
        "acme",
    )
    .unwrap();
    let task = Task::new("acme", spec);
    let inserted = store
        .insert_task(dispatcher::store::NewTask::new(task))
        .await
        .unwrap();
    inserted.into_task().id.to_string()
}

#[tokio::test]
async fn losing_every_queue_entry_mid_run_still_launches_each_task_once() {
    with_environment("e2e-flush", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
        let body = json!({"name": "flushed", "image": "registry.invalid/x:1", "command": ["true"]});
        let mut ids = Vec::new();
        for i in 0..30 {
            let (_, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
            ids.push(task["id"].as_str().unwrap().to_owned());
            if i == 10 {
                // What FLUSHALL does to us, limited to this test's keys (the server is shared).
                setup.redis.clear().await.unwrap();
            }
        }
        setup.redis.clear().await.unwrap();
        for id in &ids {
            let task = dispatcher
                .wait_for_state(&key, id, &["succeeded", "failed"])
                .await;
            assert_eq!(task["state"], "succeeded", "{task}");
            assert_eq!(jobs_of(&setup.ns, id).await.len(), 1, "task {id}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_pod_no_node_can_hold_shows_the_reason_unschedulable() {
    with_environment("e2e-stuck", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
        // Every node has 64 CPUs.
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

#[tokio::test]
async fn a_standby_watcher_takes_over_when_the_leader_dies() {
    use k8s_openapi::api::coordination::v1::Lease;
    with_environment("e2e-leader", |setup| async move {
        let key = setup.tenant("acme").await;
        let leases = setup.ns.api::<Lease>();
        let holder = || async {
            let lease = leases
                .get_opt("agent-bus-watcher")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(lease.and_then(|l| l.spec?.holder_identity))
        };
        let mut first = setup.start_as("replica-a").await;
        poll_until("replica-a to lead", CLUSTER_TIMEOUT, || async {
            match holder().await? {
                Some(h) if h == "replica-a" => Ok(()),
                other => Err(format!("holder {other:?}")),
            }
        })
        .await;
        let second = setup.start_as("replica-b").await;
        first.kill();
        let _ = first.child.wait().await;
        // The task is launched by replica-b; its outcome is recorded only once replica-b's
        // watcher holds the lease the dead replica can no longer renew.
        let body =
            json!({"name": "after-failover", "image": "registry.invalid/x:1", "command": ["true"]});
        let (status, task) = second.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let done = second
            .wait_for_state(&key, &id, &["succeeded", "failed"])
            .await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(holder().await.unwrap().as_deref(), Some("replica-b"));
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
    with_environment("e2e-placement", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
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
        let dispatcher = setup.start_with("fallback", &["--fallback-after", "2"]).await;
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
async fn a_running_task_whose_runner_is_silent_fails_with_heartbeat_lost() {
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

/// The repository's file `path`.
fn repo_file(path: &str) -> String {
    std::fs::read_to_string(testsupport::repo_root().join(path)).unwrap()
}

/// Every webhook notification Alertmanager sent to the test: (path, body).
type Notifications = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// An HTTP server that keeps every POST, standing in for the pager, chat and finance
/// endpoints of the shipped Alertmanager configuration.
async fn webhook_receiver() -> (String, Notifications) {
    let received: Notifications = Notifications::default();
    let keep = received.clone();
    let app = axum::Router::new().fallback(axum::routing::post(
        move |uri: axum::http::Uri, body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                keep.lock().unwrap().push((uri.path().to_owned(), body));
                "ok"
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}"), received)
}

/// Replaces every `key: value` line's value (the shipped files' timings) with `value`.
fn with_setting(yaml: &str, key: &str, value: &str) -> String {
    yaml.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with(&format!("{key}:")) {
                let indent = &line[..line.len() - trimmed.len()];
                format!("{indent}{key}: {value}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let response = http.get(url).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// The end-to-end path of a cost alert: a real Prometheus scrapes the dispatcher and
/// evaluates the shipped rules (their `for:` shortened to 1 s), a real Alertmanager with
/// the shipped routing (webhook URLs pointed at this test) delivers. One 2×V100 task
/// ($5.02/h) stays under the $8/h threshold; a second one pushes the running cost rate
/// over it, and AgentBusHighCostRate reaches the finance and chat receivers, not the pager.
/// (V100s: the fallback test needs a whole A100 node free.)
#[tokio::test]
async fn expensive_gpu_tasks_raise_the_cost_alert_in_alertmanager() {
    with_environment("e2e-cost-alert", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup
            .start_with(
                "cost-alert",
                &["--cost-rate-alert-dollars-per-hour", "8", "--metrics-snapshot-max-age", "0"],
            )
            .await;
        let http = reqwest::Client::new();
        let work = std::env::temp_dir().join(format!("agent-bus-alerting-{}", testsupport::unique_suffix()));
        std::fs::create_dir_all(&work).unwrap();

        let (webhooks, notifications) = webhook_receiver().await;
        let mut alertmanager_config = repo_file("deploy/alertmanager/alertmanager.yml");
        for host in ["http://pager.example.invalid", "http://chat.example.invalid", "http://finance.example.invalid"] {
            alertmanager_config = alertmanager_config.replace(host, &webhooks);
        }
        let alertmanager_config = with_setting(&with_setting(&alertmanager_config, "group_wait", "1s"), "group_interval", "1s");
        std::fs::write(work.join("alertmanager.yml"), alertmanager_config).unwrap();
        let alertmanager_port = testsupport::free_port();
        let _alertmanager = tokio::process::Command::new(testsupport::program_on_path("alertmanager"))
            .arg(format!("--config.file={}", work.join("alertmanager.yml").display()))
            .arg(format!("--storage.path={}", work.join("alertmanager-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{alertmanager_port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap();

        let rules = with_setting(&repo_file("deploy/prometheus/agent-bus.rules.yml"), "for", "1s");
        std::fs::write(work.join("agent-bus.rules.yml"), rules).unwrap();
        let target = dispatcher.base.trim_start_matches("http://");
        let prometheus_config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{rules}]\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{alertmanager_port}']\n\
             scrape_configs:\n  - job_name: agent-bus\n    static_configs:\n      - targets: ['{target}']\n",
            rules = work.join("agent-bus.rules.yml").display()
        );
        std::fs::write(work.join("prometheus.yml"), prometheus_config).unwrap();
        let prometheus_port = testsupport::free_port();
        let _prometheus = tokio::process::Command::new(testsupport::program_on_path("prometheus"))
            .arg(format!("--config.file={}", work.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", work.join("prometheus-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .arg("--log.level=warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let prometheus = format!("http://127.0.0.1:{prometheus_port}");
        let query = |expr: &str| format!("{prometheus}/api/v1/query?query={}", urlencode(expr));
        let cost_rate = || async {
            let body = get_json(&http, &query("sum(agent_bus_cost_rate_dollars_per_hour)")).await?;
            body["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| body.to_string())
        };
        let firing = || async {
            let body = get_json(&http, &format!("{prometheus}/api/v1/alerts")).await?;
            Ok::<Vec<Value>, String>(
                body["data"]["alerts"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|a| a["labels"]["alertname"] == "AgentBusHighCostRate")
                    .collect(),
            )
        };

        poll_until("prometheus to scrape the dispatcher", CLUSTER_TIMEOUT, || async {
            let body = get_json(&http, &query("up{job=\"agent-bus\"}")).await?;
            if body["data"]["result"][0]["value"][1] == "1" { Ok(()) } else { Err(body.to_string()) }
        })
        .await;

        let expensive = json!({"name": "train", "image": "registry.invalid/train:1", "command": ["python", "train.py"],
            "resources": {"cpu": "1", "memory": "4Gi", "gpu": {"count": 2, "class": "v100"}},
            "timeout_seconds": 3600, "annotations": {"agent-bus.io/test-run-seconds": "600"}});
        let (status, first) = dispatcher.post(&key, "/v1/tasks", &expensive, None).await;
        assert_eq!(status, 201, "{first}");
        // 2 × $2.48 + 1 core × $0.04 + 4 GiB × $0.005 per hour, up to its 1 h timeout.
        assert_eq!(first["cost_estimate"]["per_hour_dollars"], 5.02, "{first}");
        let first_id = first["id"].as_str().unwrap().to_owned();
        dispatcher.wait_for_state(&key, &first_id, &["running"]).await;

        // One task: the rate is scraped, a rule evaluation sees it, and nothing fires.
        let one = poll_until("prometheus to see one task's cost rate", CLUSTER_TIMEOUT, || async {
            let rate = cost_rate().await?;
            if (rate - 5.02).abs() < 0.01 { Ok(rate) } else { Err(format!("{rate}")) }
        })
        .await;
        let evaluated_after = std::time::SystemTime::now();
        poll_until("a rule evaluation after that", CLUSTER_TIMEOUT, || async {
            let body = get_json(&http, &format!("{prometheus}/api/v1/rules")).await?;
            let alerts = body["data"]["groups"].as_array().and_then(|groups| groups.iter().find(|g| g["name"] == "agent-bus").cloned()).unwrap_or_default();
            let last = alerts["lastEvaluation"].as_str().unwrap_or_default().to_owned();
            let at: jiff::Timestamp = last.parse().map_err(|e| format!("{last}: {e}"))?;
            if std::time::SystemTime::from(at) > evaluated_after + std::time::Duration::from_secs(1) {
                Ok(())
            } else {
                Err(last)
            }
        })
        .await;
        assert!(firing().await.unwrap().is_empty(), "${one}/h is under the $8/h threshold");

        let (status, second) = dispatcher.post(&key, "/v1/tasks", &expensive, None).await;
        assert_eq!(status, 201, "{second}");
        let second_id = second["id"].as_str().unwrap().to_owned();
        dispatcher.wait_for_state(&key, &second_id, &["running"]).await;

        let alert = poll_until("AgentBusHighCostRate to reach alertmanager", CLUSTER_TIMEOUT, || async {
            let body = get_json(
                &http,
                &format!("http://127.0.0.1:{alertmanager_port}/api/v2/alerts?filter={}", urlencode("alertname=\"AgentBusHighCostRate\"")),
            )
            .await?;
            match body.as_array().and_then(|alerts| alerts.iter().find(|a| a["status"]["state"] == "active").cloned()) {
                Some(alert) => Ok(alert),
                None => Err(format!("alertmanager: {body}; prometheus: {}", firing_summary(&http, &prometheus).await)),
            }
        })
        .await;
        assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
        assert_eq!(alert["labels"]["category"], "cost", "{alert}");
        let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
        assert!(summary.contains("10.04"), "the summary says the rate: {summary}");

        // Routed as the shipped configuration says: finance (category=cost, continue) and
        // chat (severity=warning); the pager stays quiet.
        let paths = poll_until("the webhooks to be called", CLUSTER_TIMEOUT, || async {
            let received = notifications.lock().unwrap().clone();
            let paths: Vec<String> = received
                .iter()
                .filter(|(_, body)| body["commonLabels"]["alertname"] == "AgentBusHighCostRate")
                .map(|(path, _)| path.clone())
                .collect();
            if paths.iter().any(|p| p == "/agent-bus/cost") && paths.iter().any(|p| p == "/agent-bus/warning") {
                Ok(paths)
            } else {
                Err(format!("{received:?}"))
            }
        })
        .await;
        assert!(!paths.iter().any(|p| p == "/agent-bus/critical"), "{paths:?}");

        for id in [&first_id, &second_id] {
            let (status, _) = dispatcher.post(&key, &format!("/v1/tasks/{id}/cancel"), &json!({}), None).await;
            assert_eq!(status, 200);
        }
        let _ = std::fs::remove_dir_all(&work);
    })
    .await;
}

/// What Prometheus says is firing, for failure messages.
async fn firing_summary(http: &reqwest::Client, prometheus: &str) -> String {
    get_json(http, &format!("{prometheus}/api/v1/alerts"))
        .await
        .map_or_else(|e| e, |body| body["data"]["alerts"].to_string())
}

/// Percent-encodes a query parameter value.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
