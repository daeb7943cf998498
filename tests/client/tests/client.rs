//! The client progenitor generated from `docs/openapi.json` against a real dispatcher:
//! the embedded default (SQLite, the in-process queue, the local executor) with the api
//! role only, so the task stays queued. It submits a task, reads it back by id, and
//! finds it in the list.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agent_bus_client_tests::{Client, types};
use testsupport::{free_port, poll_until};

/// The `dispatcher` binary of this build: `cargo test --workspace` builds it beside this
/// test binary (`target/<profile>/dispatcher`, this binary being in `deps/` below it).
fn dispatcher_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("dispatcher"))
        .unwrap();
    assert!(
        binary.is_file(),
        "{} is missing: run this test with `cargo test --workspace`, or `cargo build -p \
         dispatcher` first",
        binary.display()
    );
    binary
}

struct Dispatcher {
    _child: tokio::process::Child,
    base: String,
    key: String,
}

async fn start_dispatcher() -> Dispatcher {
    let dir = std::env::temp_dir().join(format!(
        "agent-bus-client-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let command = |args: &[&str]| {
        let mut command = tokio::process::Command::new(dispatcher_binary());
        command
            .args(args)
            .current_dir(&dir)
            .env("AGENT_BUS_LOG", "warn")
            .env("DATABASE_URL", "sqlite://agent-bus.db")
            .env_remove("REDIS_URL")
            .env_remove("KUBECONFIG");
        command
    };
    let created = command(&["tenant", "create", "acme"])
        .output()
        .await
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let child = command(&[
        "serve",
        "--executor",
        "local",
        "--roles",
        "api",
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics,
    ])
    .stdout(Stdio::inherit())
    .stderr(Stdio::inherit())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    Dispatcher {
        _child: child,
        base: format!("http://{listen}"),
        key,
    }
}

#[tokio::test]
async fn a_generated_client_submits_and_reads_a_task() {
    let dispatcher = start_dispatcher().await;
    let anonymous = Client::new(&dispatcher.base);
    poll_until(
        "the dispatcher to be ready",
        Duration::from_secs(30),
        || async {
            anonymous
                .readyz()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;

    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", dispatcher.key).parse().unwrap(),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let client = Client::new_with_client(&dispatcher.base, http);

    // The generated types check the schema's constraints (lengths, patterns) on the way in.
    let submission: types::Submission = serde_json::from_value(serde_json::json!({
        "name": "generated",
        "image": "busybox:1.37",
        "command": ["echo", "hello"],
    }))
    .unwrap();
    let created = client.submit_task(None, None, &submission).await.unwrap();
    assert_eq!(created.status(), 201);
    let types::SubmitAnswer::TaskView(task) = created.into_inner() else {
        panic!("a submit without dry_run answers a TaskView");
    };
    assert_eq!(task.state, types::TaskState::Queued);

    let read = client.get_task(&task.id).await.unwrap().into_inner();
    assert_eq!(
        (read.id.as_str(), read.tenant.as_str()),
        (task.id.as_str(), "acme")
    );
    assert_eq!(read.state, types::TaskState::Queued);

    let page = client
        .list_tasks(None, None, None, None, None, None)
        .await
        .unwrap()
        .into_inner();
    assert!(page.items.iter().any(|item| item.id == task.id), "{page:?}");

    // A refusal arrives as the document's error body.
    let error = client.get_task("no-such-task").await.unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(404), "{error}");
}
