//! Crashes and losses: a dispatcher killed between claim and create, every queue entry
//! lost mid-run, and a standby watcher taking over from a dead leader.

use super::*;

#[tokio::test]
async fn crashes_between_claim_and_create_and_after_create_leave_one_job_per_task() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-crash", |setup| async move {
        let key = setup.tenant("acme").await;
        let mut first = setup.start_keeping_jobs().await;
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
                use dispatcher::task::TaskState;
                use dispatcher::task::lifecycle::Step;
                // A bare claim, as a launcher that died right after it leaves it.
                store
                    .transition(
                        id,
                        &Step::new(TaskState::Queued, TaskState::Launching),
                        |_| None,
                        &|_, _| String::new(),
                    )
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

        let second = setup.start_keeping_jobs().await;
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
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-flush", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
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
async fn a_standby_watcher_takes_over_when_the_leader_dies() {
    use k8s_openapi::api::coordination::v1::Lease;
    testsupport::needs_env!(Cluster, Postgres, Redis);
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
