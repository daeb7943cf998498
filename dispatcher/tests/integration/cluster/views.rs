//! One task seen three ways on the control plane, as a user would look: the `agent-bus`
//! CLI (`submit`, `wait`, `get`, `list`), the REST API (what curl reads) and `kubectl get
//! job` agree on its id, name, tenant, queue, attempt, state and Job.
//!
//! The CLI is the binary `cargo test --workspace` builds beside the dispatcher; alone,
//! `cargo build -p agent-bus-cli` first.

use std::path::PathBuf;

use super::*;

fn cli_binary() -> PathBuf {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_dispatcher")).with_file_name("agent-bus");
    assert!(
        binary.is_file(),
        "{} is missing: run with `cargo test --workspace`, or `cargo build -p agent-bus-cli` first",
        binary.display()
    );
    binary
}

/// `agent-bus --server … --token … ARGS`: its exit code and standard output.
async fn cli(base: &str, key: &str, args: &[&str]) -> (i32, String) {
    let output = tokio::time::timeout(
        CLUSTER_TIMEOUT,
        tokio::process::Command::new(cli_binary())
            .args(["--server", base, "--token", key])
            .args(args)
            .env_remove("AGENT_BUS_URL")
            .env_remove("AGENT_BUS_TOKEN")
            .env("AGENT_BUS_CONFIG", "/nonexistent/agent-bus.yaml")
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("agent-bus {args:?} ran longer than {CLUSTER_TIMEOUT:?}"))
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[tokio::test]
async fn the_cli_the_api_and_kubectl_agree_on_a_task() {
    testsupport::needs_env!(Cluster, Postgres, Redis, Program("kubectl"));
    with_environment("e2e-views", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let base = dispatcher.base.clone();
        let file =
            std::env::temp_dir().join(format!("views-{}.json", uuid::Uuid::new_v4().simple()));
        // kwok ends the pod after a second (its annotation), as a command would.
        std::fs::write(
            &file,
            json!({"annotations": {"agent-bus.io/test-run-seconds": "1"}}).to_string(),
        )
        .unwrap();
        let (code, id) = cli(
            &base,
            &key,
            &[
                "submit",
                "-f",
                file.to_str().unwrap(),
                "--name",
                "views",
                "--image",
                "registry.invalid/views:1",
                "--queue",
                "batch",
                "--",
                "sh",
                "-c",
                "echo hi",
            ],
        )
        .await;
        let _ = std::fs::remove_file(&file);
        assert_eq!(code, 0);
        let id = id.trim().to_owned();
        let (code, _) = cli(&base, &key, &["wait", "--quiet", &id]).await;
        assert_eq!(code, 0, "the task's exit code");

        // The API, as curl reads it, and the CLI's JSON: the same document.
        let api = dispatcher.get(&key, &format!("/v1/tasks/{id}")).await;
        let (code, shown) = cli(&base, &key, &["get", &id, "-o", "json"]).await;
        assert_eq!(code, 0);
        let shown: Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(shown, api);
        assert_eq!(
            (&api["name"], &api["queue"], &api["state"], &api["attempt"]),
            (
                &json!("views"),
                &json!("batch"),
                &json!("succeeded"),
                &json!(1)
            )
        );

        // The CLI's table: one row, the same name, state and attempt.
        let (code, table) = cli(&base, &key, &["list", "--queue", "batch"]).await;
        assert_eq!(code, 0);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
        assert_eq!(
            (column("NAME"), column("STATE"), column("ATTEMPT")),
            ("views", "succeeded", "1"),
            "{table}"
        );

        // kubectl: the attempt's Job, named and labelled after the task, complete.
        let output = tokio::process::Command::new("kubectl")
            .args(["get", "jobs", "-n", &setup.ns.name, "-o", "json", "-l"])
            .arg(format!("agent-bus.io/task-id={}", id.replace('-', "")))
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let jobs: Value = serde_json::from_slice(&output.stdout).unwrap();
        let items = jobs["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "exactly one Job for the one attempt");
        let job = &items[0];
        assert_eq!(
            job["metadata"]["name"],
            format!("ab-{}-1", id.replace('-', ""))
        );
        let labels = &job["metadata"]["labels"];
        assert_eq!(labels["agent-bus.io/tenant"], "acme");
        assert_eq!(labels["agent-bus.io/queue"], "batch");
        assert_eq!(labels["agent-bus.io/attempt"], "1");
        assert_eq!(job["status"]["succeeded"], 1, "{job}");
    })
    .await;
}
