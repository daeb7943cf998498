//! What a task under the local executor cannot reach, and what its report token cannot
//! do: black-box, with the `dispatcher` binary on an SQLite file and real tasks.
//!
//! - as root, each tenant's tasks run as a user of their own: a task cannot read the
//!   report token (its runner's `/proc` files), the dispatcher's environment, the
//!   database (which holds the report-token key) or another tenant's folder;
//! - without root, the dispatcher refuses to serve beyond loopback or more than one
//!   tenant unless `--local-executor-shared-user` says so;
//! - reports after an attempt's end get 409, past its allowance 429, and a `cost_usd` of
//!   1e308 422 while the cost metrics stay finite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::time::Duration;

use serde_json::{Value, json};
use testsupport::poll_until;

use crate::common::{run_dispatcher, scrape, start_local_dispatcher_with};
use crate::local::Local;

/// Root runs tasks as users of their own; without it these cases cannot show anything.
/// `make test` and CI run as root, so there they fail instead of skipping.
fn running_as_root() -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        assert!(
            !testsupport::environment_required(),
            "this test needs root (the local executor gives tasks users of their own only as root)"
        );
        eprintln!(
            "skipped: needs root (the local executor gives tasks users of their own only as root)"
        );
    }
    root
}

#[tokio::test]
async fn a_task_reads_neither_the_token_nor_the_database_nor_another_tenants_folder() {
    if !running_as_root() {
        return;
    }
    let local = Local(start_local_dispatcher_with("sqlite://agent-bus.db", &[]).await);
    let (ok, beta_key, stderr) = run_dispatcher(&local.dir, &["tenant", "create", "beta"]).await;
    assert!(ok, "{stderr}");
    let db = local.dir.join("agent-bus.db");
    let dispatcher_pid = local.child.id().unwrap();
    let mode = std::fs::metadata(&db).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "the database is the dispatcher's alone");

    // Each refusal has its own exit code, so a failure says which check let it through.
    let script = format!(
        r#"
        test "$(id -u)" != 0 || exit 10
        test -z "${{AGENT_BUS_REPORT_TOKEN:-}}" || exit 11
        if cat /proc/$PPID/environ > /dev/null 2>&1; then exit 12; fi
        if (exec 3< /proc/$PPID/mem) 2> /dev/null; then exit 13; fi
        if cat /proc/{dispatcher_pid}/environ > /dev/null 2>&1; then exit 14; fi
        if cat {db} > /dev/null 2>&1; then exit 15; fi
        if cat {db}-wal > /dev/null 2>&1; then exit 16; fi
        cat /proc/self/environ > /dev/null || exit 17
        echo only-for-acme > "$HOME/private" || exit 18
        echo "home=$HOME"
        "#,
        db = db.display()
    );
    let acme_task = local
        .submit(json!({"name": "probe", "image": "unused", "command": ["sh", "-c", script]}))
        .await;
    let task = local.wait_until_over(&acme_task).await;
    assert_eq!(task["state"], "succeeded", "{task}");
    let private = local
        .dir
        .join("agent-bus-work")
        .join("acme")
        .join(format!("{acme_task}-1"))
        .join("private");
    assert_eq!(
        std::fs::read_to_string(&private).unwrap(),
        "only-for-acme\n",
        "the file the other tenant's task will try to read is there"
    );
    let acme_uid = std::fs::metadata(&private).unwrap().uid();
    assert!(acme_uid >= 2_000_000_000, "{acme_uid}");

    let script = format!(
        r#"
        if cat {private} > /dev/null 2>&1; then exit 20; fi
        if ls {acme} > /dev/null 2>&1; then exit 21; fi
        if ls {root} > /dev/null 2>&1; then exit 22; fi
        test "$(id -u)" != {acme_uid} || exit 23
        echo mine > "$HOME/private" || exit 24
        "#,
        private = private.display(),
        acme = local.dir.join("agent-bus-work").join("acme").display(),
        root = local.dir.join("agent-bus-work").display(),
    );
    let beta_task = local
        .submit_as(
            &beta_key,
            &json!({"name": "snoop", "image": "unused", "command": ["sh", "-c", script]}),
        )
        .await;
    let task = poll_until("beta's task to end", Duration::from_secs(30), || async {
        let task = local
            .get_as(&beta_key, &format!("/v1/tasks/{beta_task}"))
            .await?;
        if task["state"] == "succeeded" || task["state"] == "failed" {
            Ok(task)
        } else {
            Err(task.to_string())
        }
    })
    .await;
    assert_eq!(task["state"], "succeeded", "{task}");
}

#[tokio::test]
async fn without_root_one_tenant_on_loopback_or_the_shared_user_flag() {
    testsupport::needs_env!(Program("setpriv"));
    if !running_as_root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!(
        "agent-bus-nonroot-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    // Nobody runs copies: the build may sit where other users cannot pass (CI keeps it
    // under root's 0700 home). The runner goes beside the dispatcher, where serve finds it.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_dispatcher"));
    for name in ["dispatcher", "runner"] {
        let copy = bin.join(name);
        std::fs::copy(built.with_file_name(name), &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dispatcher = bin.join("dispatcher");
    let as_nobody = |args: &[&str]| {
        let mut command = tokio::process::Command::new("setpriv");
        command
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "--",
            ])
            .arg(&dispatcher)
            .args(args)
            .current_dir(&dir)
            .env("AGENT_BUS_LOG", "warn")
            .env("DATABASE_URL", "sqlite://agent-bus.db")
            .env_remove("REDIS_URL")
            .env_remove("KUBECONFIG")
            .kill_on_drop(true);
        command
    };
    let port = testsupport::free_port().to_string();
    let everywhere = format!("0.0.0.0:{port}");
    let output = as_nobody(&["serve", "--executor", "local", "--listen", &everywhere])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("beyond loopback"), "{stderr}");
    assert!(stderr.contains("--local-executor-shared-user"), "{stderr}");

    let mut keys = Vec::new();
    for tenant in ["acme", "beta"] {
        let output = as_nobody(&["tenant", "create", tenant])
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        keys.push(String::from_utf8(output.stdout).unwrap().trim().to_owned());
    }
    let loopback = format!("127.0.0.1:{port}");
    let output = as_nobody(&["serve", "--executor", "local", "--listen", &loopback])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("it has 2 tenants"), "{stderr}");

    // The flag accepts it: the dispatcher serves, and keeps its own environment (its
    // database URL, a report secret) from the tasks that share its user.
    // A metrics port of its own: the default one may be taken (a `make run` beside).
    let metrics = format!("127.0.0.1:{}", testsupport::free_port());
    let serving = as_nobody(&[
        "serve",
        "--executor",
        "local",
        "--listen",
        &loopback,
        "--metrics-listen",
        &metrics,
        "--local-executor-shared-user",
    ])
    .spawn()
    .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://{loopback}");
    crate::common::wait_until_ready(&http, &base, Duration::from_secs(30)).await;
    let pid = serving.id().unwrap();
    let script = format!("if cat /proc/{pid}/environ > /dev/null 2>&1; then exit 3; fi");
    let submitted: Value = http
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(&keys[1])
        .json(&json!({"name": "snoop", "image": "unused", "command": ["sh", "-c", script]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["id"].as_str().unwrap().to_owned();
    let task = poll_until("the task to end", Duration::from_secs(30), || async {
        let task: Value = http
            .get(format!("{base}/v1/tasks/{id}"))
            .bearer_auth(&keys[1])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if task["state"] == "succeeded" || task["state"] == "failed" {
            Ok(task)
        } else {
            Err(task.to_string())
        }
    })
    .await;
    assert_eq!(task["state"], "succeeded", "{task}");
    drop(serving);
    let _ = std::fs::remove_dir_all(&dir);
}

const SECRET: &str = "a report secret of the test, 32 bytes or more";

fn token(id: &str, attempt: u32) -> String {
    dispatcher::report::ReportTokens::new(SECRET.as_bytes()).mint(
        id.parse().unwrap(),
        attempt,
        jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
    )
}

/// POSTs `reports` as the runner of attempt 1 of task `id` would: status and body.
async fn post_reports(local: &Local, id: &str, reports: Value) -> (u16, Value) {
    let response = local
        .http
        .post(format!(
            "{}/internal/v1/tasks/{id}/attempts/1/reports",
            local.base
        ))
        .bearer_auth(token(id, 1))
        .json(&json!({ "reports": reports }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn progress(sequence: u64) -> Value {
    json!({"sequence": sequence, "sent_at": "2026-12-02T12:00:00Z", "kind": "progress", "percent": 10.0})
}

#[tokio::test]
async fn reports_are_refused_after_the_end_past_the_allowance_and_above_the_cost_cap() {
    let local = Local(
        start_local_dispatcher_with(
            "sqlite://agent-bus.db",
            &[
                "--report-secret",
                SECRET,
                "--max-reports-per-attempt",
                "5",
                "--reports-after-end",
                "1",
            ],
        )
        .await,
    );
    let id = local
        .submit(json!({"name": "long", "image": "unused", "command": ["sleep", "60"]}))
        .await;
    poll_until("the task to run", Duration::from_secs(30), || async {
        let task = local.read(&id).await?;
        if task["state"] == "running" {
            Ok(())
        } else {
            Err(task.to_string())
        }
    })
    .await;

    // The allowance: five progress reports, then 429 with nothing of the batch stored.
    let (status, body) = post_reports(
        &local,
        &id,
        json!((1..=5).map(progress).collect::<Vec<_>>()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_reports(&local, &id, json!([progress(6)])).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "reports_exhausted");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("--max-reports-per-attempt"), "{message}");
    // A resend of what was stored is no new report: still fine.
    let (status, body) = post_reports(&local, &id, json!([progress(5)])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicates"], 1);
    // Five progress reports and the runner's own started (which may come a little later).
    poll_until(
        "the runner's started report",
        Duration::from_secs(30),
        || async {
            let runner = local.read(&id).await?["runner"].clone();
            if runner["reports_stored"] == 6 {
                Ok(())
            } else {
                Err(runner.to_string())
            }
        },
    )
    .await;

    // A cost that would make the metrics infinite.
    let usage = |sequence: u64, cost: f64| json!([{"sequence": sequence, "sent_at": "2026-12-02T12:00:00Z", "kind": "usage", "model": "m", "calls": 1, "cost_usd": cost}]);
    for _ in 0..2 {
        let (status, body) = post_reports(&local, &id, usage(7, 1e308)).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["field"], "reports[0].cost_usd");
    }
    let metrics = scrape(&local.http, &local.metrics).await;
    assert!(metrics.contains("agent_bus_"), "{metrics}");
    let infinite: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && (l.contains("Inf") || l.contains("NaN")))
        .filter(|l| !l.contains("le=\"+Inf\""))
        .collect();
    assert!(infinite.is_empty(), "{infinite:?}");

    // After the end (and the second the final reports may take): 409, also for a resend.
    let response = local
        .http
        .post(format!("{}/v1/tasks/{id}/cancel", local.base))
        .bearer_auth(&local.key)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let heartbeat =
        json!([{"sequence": 1_000, "sent_at": "2026-12-02T12:00:00Z", "kind": "heartbeat"}]);
    let body = poll_until(
        "reports to be refused after the end",
        Duration::from_secs(30),
        || async {
            match post_reports(&local, &id, heartbeat.clone()).await {
                (409, body) => Ok(body),
                (status, body) => Err(format!("{status} {body}")),
            }
        },
    )
    .await;
    assert_eq!(body["error"]["code"], "attempt_over");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ended at"),
        "{body}"
    );
    let (status, _) = post_reports(&local, &id, json!([progress(1)])).await;
    assert_eq!(status, 409);
}
