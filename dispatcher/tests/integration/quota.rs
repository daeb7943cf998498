//! Tenant quotas and fairness with the embedded default (the `dispatcher` binary, an
//! SQLite file, the in-process queue and local processes): the quota command, a task
//! held by its tenant's quota with its `queue_position`, and one tenant's single task
//! launched among the first while another tenant has 300 queued.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use testsupport::poll_until;

use crate::common::{
    LocalDispatcher, run_dispatcher as dispatcher, scrape, start_local_dispatcher,
    start_local_dispatcher_with,
};

async fn submit(local: &LocalDispatcher, key: &str, body: &Value) -> String {
    local.submit_as(key, body).await
}

async fn read(local: &LocalDispatcher, key: &str, id: &str) -> Result<Value, String> {
    local.get_as(key, &format!("/v1/tasks/{id}")).await
}

async fn wait_for(
    local: &LocalDispatcher,
    key: &str,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    poll_until(
        &format!("task {id} to {what}"),
        Duration::from_mins(1),
        || async {
            let task = read(local, key, id).await?;
            if done(&task) {
                Ok(task)
            } else {
                Err(task.to_string())
            }
        },
    )
    .await
}

fn time(task: &Value, field: &str) -> jiff::Timestamp {
    task[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing: {task}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_quota_command_sets_shows_and_clears() {
    let dir =
        std::env::temp_dir().join(format!("agent-bus-quota-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(dispatcher(&dir, &["tenant", "create", "acme"]).await.0);

    let quota = |args: &'static [&'static str]| {
        let dir = dir.clone();
        async move {
            let mut all = vec!["tenant", "quota", "acme"];
            all.extend_from_slice(args);
            dispatcher(&dir, &all).await
        }
    };
    assert_eq!(quota(&[]).await.1, "acme: no quota");
    assert_eq!(
        quota(&["--max-running", "2", "--max-gpus", "a100=4"])
            .await
            .1,
        "acme: max-running=2 max-gpus a100=4"
    );
    // Flags change what they name and keep the rest.
    assert_eq!(
        quota(&["--max-gpus", "h100=1"]).await.1,
        "acme: max-running=2 max-gpus a100=4 max-gpus h100=1"
    );
    assert_eq!(
        quota(&[]).await.1,
        "acme: max-running=2 max-gpus a100=4 max-gpus h100=1"
    );
    assert_eq!(quota(&["--clear"]).await.1, "acme: no quota");

    for (args, says) in [
        (
            &["tenant", "quota", "acme", "--max-gpus", "a100"][..],
            "CLASS=N",
        ),
        (
            &["tenant", "quota", "acme", "--max-running", "-3"],
            "--max-running",
        ),
        (
            &["tenant", "quota", "acme", "--clear", "--max-running", "1"],
            "--clear",
        ),
        (
            &[
                "tenant",
                "quota",
                "acme",
                "--max-gpus",
                "a100=1",
                "--max-gpus",
                "a100=2",
            ],
            "given twice",
        ),
        (
            &["tenant", "quota", "nobody"],
            "tenant 'nobody' does not exist",
        ),
    ] {
        let (ok, _, stderr) = dispatcher(&dir, args).await;
        assert!(!ok, "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tenant with `--max-running 1` submits two tasks: one runs, the other stays queued
/// with reason `tenant_quota` and a `queue_position`, and runs once the first has ended.
#[tokio::test]
async fn quota_holds_the_second_task_with_a_queue_position() {
    let local = start_local_dispatcher("sqlite://agent-bus.db").await;
    let (ok, out, err) = dispatcher(
        &local.dir,
        &["tenant", "quota", "acme", "--max-running", "1"],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "acme: max-running=1");

    let body = json!({"name": "long", "image": "unused", "command": ["sleep", "3"]});
    let ids = [
        submit(&local, &local.key, &body).await,
        submit(&local, &local.key, &body).await,
    ];
    let (running, held) = poll_until(
        "one task to run and the other to be held",
        Duration::from_secs(30),
        || async {
            let tasks = [
                read(&local, &local.key, &ids[0]).await?,
                read(&local, &local.key, &ids[1]).await?,
            ];
            let states: Vec<(&str, &str)> = tasks
                .iter()
                .map(|t| {
                    (
                        t["state"].as_str().unwrap_or_default(),
                        t["reason"].as_str().unwrap_or_default(),
                    )
                })
                .collect();
            match states.as_slice() {
                [("running", _), ("queued", "tenant_quota")] => {
                    Ok((tasks[0].clone(), tasks[1].clone()))
                }
                [("queued", "tenant_quota"), ("running", _)] => {
                    Ok((tasks[1].clone(), tasks[0].clone()))
                }
                _ => Err(format!("{states:?}")),
            }
        },
    )
    .await;
    assert_eq!(held["queue_position"], 1, "{held}");
    assert!(
        held["message"]
            .as_str()
            .unwrap()
            .contains("runs 1 of its 1 tasks"),
        "{held}"
    );
    // Its start depends on the running task, not on the launch rate.
    assert_eq!(held.get("estimated_start"), Some(&Value::Null), "{held}");
    assert!(running.get("queue_position").is_none(), "{running}");

    let over = |t: &Value| t["state"] == "succeeded";
    let first = wait_for(
        &local,
        &local.key,
        running["id"].as_str().unwrap(),
        "succeed",
        over,
    )
    .await;
    let second = wait_for(
        &local,
        &local.key,
        held["id"].as_str().unwrap(),
        "succeed",
        over,
    )
    .await;
    assert!(
        time(&second, "launched_at") >= time(&first, "finished_at"),
        "the held task launched only once the first had ended: {first} {second}"
    );
    // The waiting-on-quota gauge is empty again.
    let metrics = scrape(&local.http, &local.metrics).await;
    assert!(
        !metrics.contains("agent_bus_tasks_waiting_on_quota{"),
        "{metrics}"
    );
}

/// Tenant acme has 300 queued tasks and tenant beta one, all stored while no launcher
/// runs; a launcher that launches one task at a time then starts beta's task second:
/// the round-robin across tenants gives beta the turn after acme's first.
#[tokio::test]
async fn a_single_task_is_not_starved_by_another_tenants_backlog() {
    let api = start_local_dispatcher_with("sqlite://agent-bus.db", &["--roles", "api"]).await;
    let (ok, beta_key, err) = dispatcher(&api.dir, &["tenant", "create", "beta"]).await;
    assert!(ok, "{err}");
    let quick = json!({"name": "quick", "image": "unused", "command": ["true"]});
    let mut backlog = Vec::new();
    for _ in 0..300 {
        backlog.push(submit(&api, &api.key, &quick).await);
    }
    let single = submit(&api, &beta_key, &quick).await;
    let LocalDispatcher {
        mut child,
        dir,
        key,
        http,
        ..
    } = api;
    child.kill().await.unwrap();

    // The same file, now with a launcher taking one task at a time; its reconciler finds
    // the stored tasks the (new, empty) in-process queue lacks.
    let port = testsupport::free_port();
    let listen = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", testsupport::free_port());
    let launcher = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args([
            "serve",
            "--executor",
            "local",
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics,
            "--launch-concurrency",
            "1",
            "--reconcile-interval",
            "1s",
        ])
        .current_dir(&dir)
        .env("AGENT_BUS_LOG", "warn")
        .env("DATABASE_URL", "sqlite://agent-bus.db")
        .env_remove("REDIS_URL")
        .env_remove("KUBECONFIG")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let local = LocalDispatcher {
        child: launcher,
        dir,
        base: format!("http://127.0.0.1:{port}"),
        metrics: format!("http://{metrics}"),
        key,
        http,
    };
    crate::common::wait_until_ready(&local.http, &local.base, Duration::from_secs(30)).await;

    let beta = wait_for(&local, &beta_key, &single, "launch", |t| {
        t.get("launched_at").is_some_and(Value::is_string)
    })
    .await;
    let launched_at = time(&beta, "launched_at");
    let mut before = 0;
    for id in &backlog {
        let task = read(&local, &local.key, id).await.unwrap();
        if let Some(at) = task["launched_at"].as_str()
            && at.parse::<jiff::Timestamp>().unwrap() < launched_at
        {
            before += 1;
        }
    }
    assert!(
        before <= 2,
        "{before} of acme's tasks launched before beta's single task"
    );
}
