//! A full namespace is a wait, not a failure; no Job outlives its task: a ResourceQuota
//! of three Jobs that ten tasks share in turn, pods a quota refuses until it is raised, a
//! LimitRange the pod can never fit, a task waiting for room that still expires or is
//! cancelled, and a cancel whose Job delete is forbidden until the dispatcher's Role
//! allows it (also across a kill -9).

use super::*;
use crate::common::scrape;

use k8s_openapi::api::core::v1::{LimitRange, ResourceQuota, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams};

/// Creates ResourceQuota `tasks` with `hard` in the test namespace and waits until the
/// quota controller has counted the namespace (until then Kubernetes refuses every
/// create it covers with "status unknown for quota").
async fn quota(ns: &TestNamespace, hard: Value) {
    let quotas = ns.api::<ResourceQuota>();
    let quota: ResourceQuota =
        serde_json::from_value(json!({"metadata": {"name": "tasks"}, "spec": {"hard": hard}}))
            .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    poll_until("the quota to be counted", CLUSTER_TIMEOUT, || async {
        let quota = quotas.get("tasks").await.map_err(|e| e.to_string())?;
        let counted = quota
            .status
            .as_ref()
            .and_then(|s| s.used.as_ref())
            .is_some();
        if counted {
            Ok(())
        } else {
            Err("no status yet".to_owned())
        }
    })
    .await;
}

async fn events_of(dispatcher: &Dispatcher, key: &str, id: &str) -> Vec<Value> {
    let events = dispatcher.get(key, &format!("/v1/tasks/{id}/events")).await;
    events["items"].as_array().cloned().unwrap_or_default()
}

async fn no_jobs_left(ns: &TestNamespace) {
    poll_until("every job to be deleted", CLUSTER_TIMEOUT, || async {
        let jobs = ns
            .api::<Job>()
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = jobs
            .items
            .iter()
            .filter_map(|j| j.metadata.name.clone())
            .collect();
        if names.is_empty() {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn a_quota_of_three_jobs_runs_ten_tasks_in_turn() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-job-quota", |setup| async move {
        quota(&setup.ns, json!({"count/jobs.batch": "3"})).await;
        let key = setup.tenant("acme").await;
        let dispatcher = setup
            .start_with("job-quota", &["--cluster-quota-retry-max", "3"])
            .await;
        let body = json!({"name": "in-turn", "image": "registry.invalid/x:1", "command": ["true"],
            "annotations": {"agent-bus.io/test-run-seconds": "2"}});
        let mut ids = Vec::new();
        for _ in 0..10 {
            let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
            assert_eq!(status, 201, "{task}");
            ids.push(task["id"].as_str().unwrap().to_owned());
        }
        // Some wait for room, visibly, while three run.
        let waiting = poll_until("a task waiting for room", CLUSTER_TIMEOUT, || async {
            for id in &ids {
                let task = dispatcher.get(&key, &format!("/v1/tasks/{id}")).await;
                if task["reason"] == "cluster_quota" {
                    return Ok(task);
                }
            }
            Err("none shows cluster_quota".to_owned())
        })
        .await;
        assert_eq!(waiting["state"], "launching", "{waiting}");
        assert!(
            waiting["message"]
                .as_str()
                .unwrap()
                .contains("exceeded quota"),
            "{waiting}"
        );

        for id in &ids {
            let task = dispatcher
                .wait_for_state(&key, id, &["succeeded", "failed", "expired"])
                .await;
            assert_eq!(task["state"], "succeeded", "{task}");
        }
        let waited =
            futures::future::join_all(ids.iter().map(|id| events_of(&dispatcher, &key, id))).await;
        let noted = waited
            .iter()
            .filter(|events| events.iter().any(|e| e["reason"] == "cluster_quota"))
            .count();
        assert!(noted >= 1, "no task recorded cluster_quota: {waited:?}");
        // Each finished Job was deleted once its outcome was recorded: that is what made
        // room for the next, and none is left behind.
        no_jobs_left(&setup.ns).await;
    })
    .await;
}

#[tokio::test]
async fn pods_a_quota_refuses_wait_as_cluster_quota_and_start_when_it_is_raised() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-pod-quota", |setup| async move {
        quota(&setup.ns, json!({"pods": "0"})).await;
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
        let body = json!({"name": "no-room", "image": "registry.invalid/x:1", "command": ["true"]});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        // The Job exists; its pod does not: the Job controller's FailedCreate says why.
        let waiting = poll_until("the cluster_quota reason", CLUSTER_TIMEOUT, || async {
            let task = dispatcher.get(&key, &format!("/v1/tasks/{id}")).await;
            if task["reason"] == "cluster_quota" {
                Ok(task)
            } else {
                Err(task.to_string())
            }
        })
        .await;
        assert_eq!(
            waiting["state"], "launched",
            "waiting is not failing: {waiting}"
        );
        let message = waiting["message"].as_str().unwrap();
        assert!(
            message.contains("exceeded quota: tasks") && !message.contains("pods \""),
            "{waiting}"
        );
        assert_eq!(jobs_of(&setup.ns, &id).await.len(), 1);

        let raise = json!({"spec": {"hard": {"pods": "10"}}});
        setup
            .ns
            .api::<ResourceQuota>()
            .patch("tasks", &PatchParams::default(), &Patch::Merge(&raise))
            .await
            .unwrap();
        let done = dispatcher
            .wait_for_state(&key, &id, &["succeeded", "failed", "timed_out"])
            .await;
        assert_eq!(done["state"], "succeeded", "{done}");
        let events = events_of(&dispatcher, &key, &id).await;
        assert!(
            events
                .iter()
                .any(|e| e["reason"] == "cluster_quota" && e["to"] == "launched"),
            "{events:?}"
        );
        no_jobs_left(&setup.ns).await;
    })
    .await;
}

#[tokio::test]
async fn a_pod_a_limit_range_refuses_fails_its_task_with_the_rule() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-limit-range", |setup| async move {
        let limits: LimitRange = serde_json::from_value(json!({"metadata": {"name": "small"},
            "spec": {"limits": [{"type": "Container", "max": {"cpu": "1"}}]}}))
        .unwrap();
        setup
            .ns
            .api::<LimitRange>()
            .create(&PostParams::default(), &limits)
            .await
            .unwrap();
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
        let body = json!({"name": "too-wide", "image": "registry.invalid/x:1", "command": ["true"],
            "resources": {"cpu": "2"}});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let failed = dispatcher
            .wait_for_state(&key, &id, &["failed", "succeeded", "timed_out"])
            .await;
        assert_eq!(failed["state"], "failed", "{failed}");
        assert_eq!(failed["reason"], "launch_rejected", "{failed}");
        let message = failed["message"].as_str().unwrap();
        assert!(
            message.contains("maximum cpu usage per Container is 1"),
            "{failed}"
        );
        no_jobs_left(&setup.ns).await;
    })
    .await;
}

/// Creates ServiceAccount `dispatcher` with a Role that has everything the dispatcher
/// needs in the test namespace except deleting Jobs, and returns a kubeconfig file that
/// authenticates as it (a TokenRequest token).
async fn dispatcher_identity_without_delete(ns: &TestNamespace) -> std::path::PathBuf {
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "dispatcher"}})).unwrap();
    ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let role: Role = serde_json::from_value(
        json!({"metadata": {"name": "dispatcher"}, "rules": role_rules(false)}),
    )
    .unwrap();
    ns.api::<Role>()
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({"metadata": {"name": "dispatcher"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dispatcher"},
        "subjects": [{"kind": "ServiceAccount", "name": "dispatcher", "namespace": ns.name}]}))
    .unwrap();
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .unwrap();
    let token = ns
        .api::<ServiceAccount>()
        .create_token_request("dispatcher", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let admin = kube::config::Kubeconfig::read_from(std::env::var("KUBECONFIG").unwrap()).unwrap();
    let cluster = admin.clusters[0].cluster.clone().unwrap();
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": cluster.server,
            "certificate-authority": cluster.certificate_authority,
            "certificate-authority-data": cluster.certificate_authority_data}}],
        "users": [{"name": "dispatcher", "user": {"token": token}}],
        "contexts": [{"name": "dispatcher", "context": {"cluster": "test", "user": "dispatcher", "namespace": ns.name}}],
        "current-context": "dispatcher",
    });
    let path = std::env::temp_dir().join(format!(
        "agent-bus-kubeconfig-{}",
        testsupport::unique_suffix()
    ));
    std::fs::write(&path, serde_json::to_string(&kubeconfig).unwrap()).unwrap();
    path
}

/// The dispatcher's Role in the tasks namespace (as `manifests/base/rbac.yaml`, plus the
/// Lease, which lives in the same namespace here), with or without deleting Jobs.
fn role_rules(delete: bool) -> Value {
    let mut job_verbs = vec!["create", "get", "list", "watch"];
    if delete {
        job_verbs.push("delete");
    }
    json!([
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": job_verbs},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
    ])
}

async fn allow_delete(ns: &TestNamespace, delete: bool) {
    let patch = json!({"rules": role_rules(delete)});
    ns.api::<Role>()
        .patch("dispatcher", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Submits a task that runs ten minutes, waits until its Job exists, and cancels it.
async fn cancel_a_long_task(dispatcher: &Dispatcher, ns: &TestNamespace, key: &str) -> String {
    let body = json!({"name": "long", "image": "registry.invalid/x:1", "command": ["sleep", "600"],
        "annotations": {"agent-bus.io/test-run-seconds": "600"}});
    let (status, task) = dispatcher.post(key, "/v1/tasks", &body, None).await;
    assert_eq!(status, 201, "{task}");
    let id = task["id"].as_str().unwrap().to_owned();
    dispatcher.wait_for_state(key, &id, &["running"]).await;
    let (status, cancelled) = dispatcher
        .post(key, &format!("/v1/tasks/{id}/cancel"), &json!({}), None)
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");
    // Several sweeps later the Job is still there: every delete was refused.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let jobs = jobs_of(ns, &id).await;
        assert!(
            jobs.len() == 1 && jobs[0].metadata.deletion_timestamp.is_none(),
            "the delete should be refused"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    id
}

async fn job_gone(ns: &TestNamespace, id: &str) {
    poll_until(
        "the cancelled task's job to be deleted",
        CLUSTER_TIMEOUT,
        || async {
            let jobs = jobs_of(ns, id).await;
            if jobs.is_empty() {
                Ok(())
            } else {
                Err(format!("{} jobs", jobs.len()))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_cancelled_tasks_job_is_deleted_once_the_delete_is_allowed_even_across_a_kill() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-refused-delete", |setup| async move {
        let kubeconfig = dispatcher_identity_without_delete(&setup.ns).await;
        let kubeconfig = kubeconfig.to_str().unwrap();
        let env = [("KUBECONFIG", kubeconfig)];
        let key = setup.tenant("acme").await;
        let mut dispatcher = setup.start_with_env("refused-delete", &[], &env).await;

        // The fault lifts while the dispatcher runs: its sweeps retry until the Job is gone.
        let first = cancel_a_long_task(&dispatcher, &setup.ns, &key).await;
        let metrics = scrape(&dispatcher.http, &dispatcher.metrics).await;
        assert!(
            metrics.contains(r#"agent_bus_errors_total{component="watcher",kind="job_delete"}"#),
            "{metrics}"
        );
        allow_delete(&setup.ns, true).await;
        job_gone(&setup.ns, &first).await;

        // The fault lifts while no dispatcher runs (kill -9): the next one deletes it.
        allow_delete(&setup.ns, false).await;
        let second = cancel_a_long_task(&dispatcher, &setup.ns, &key).await;
        dispatcher.kill();
        let _ = dispatcher.child.wait().await;
        allow_delete(&setup.ns, true).await;
        let restarted = setup.start_with_env("refused-delete", &[], &env).await;
        job_gone(&setup.ns, &second).await;
        for id in [&first, &second] {
            let task = restarted.get(&key, &format!("/v1/tasks/{id}")).await;
            assert_eq!(task["state"], "cancelled", "{task}");
        }
        let _ = std::fs::remove_file(kubeconfig);
    })
    .await;
}

#[tokio::test]
async fn a_task_waiting_for_room_still_expires_at_its_queue_ttl_and_cancels() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-quota-ttl", |setup| async move {
        // No room at all: every create is refused.
        quota(&setup.ns, json!({"count/jobs.batch": "0"})).await;
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start().await;
        let submit = |body: Value| {
            let dispatcher = &dispatcher;
            let key = &key;
            async move {
                let (status, task) = dispatcher.post(key, "/v1/tasks", &body, None).await;
                assert_eq!(status, 201, "{task}");
                task["id"].as_str().unwrap().to_owned()
            }
        };
        let expiring = submit(
            json!({"name": "short-lived", "image": "registry.invalid/x:1", "command": ["true"],
            "queue_ttl_seconds": 8}),
        )
        .await;
        let cancelled = submit(
            json!({"name": "cancel-me", "image": "registry.invalid/x:1", "command": ["true"]}),
        )
        .await;
        for id in [&expiring, &cancelled] {
            poll_until("the cluster_quota reason", CLUSTER_TIMEOUT, || async {
                let task = dispatcher.get(&key, &format!("/v1/tasks/{id}")).await;
                if task["reason"] == "cluster_quota" && task["state"] == "launching" {
                    Ok(())
                } else {
                    Err(task.to_string())
                }
            })
            .await;
        }
        let (status, task) = dispatcher
            .post(
                &key,
                &format!("/v1/tasks/{cancelled}/cancel"),
                &json!({}),
                None,
            )
            .await;
        assert_eq!(
            (status, task["state"].as_str()),
            (200, Some("cancelled")),
            "{task}"
        );
        let expired = dispatcher
            .wait_for_state(&key, &expiring, &["expired", "succeeded", "failed"])
            .await;
        assert_eq!(expired["state"], "expired", "{expired}");
        assert_eq!(expired["reason"], "queue_ttl", "{expired}");
        let still = dispatcher
            .get(&key, &format!("/v1/tasks/{cancelled}"))
            .await;
        assert_eq!(still["state"], "cancelled", "{still}");
        no_jobs_left(&setup.ns).await;
    })
    .await;
}
