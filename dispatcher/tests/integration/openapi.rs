//! The OpenAPI document of a running dispatcher (the embedded default: SQLite, the
//! in-process queue, the local executor): it is the checked-in `docs/openapi.json`, and
//! Schemathesis (PyPI, pinned in `tests/env/schemathesis.txt`) run against it with its
//! default checks, authenticated as a tenant, finds nothing.
//!
//! The dispatcher runs the api role only (`--roles api`): Schemathesis submits whatever
//! the schema allows, and nothing of that may run as a process on this machine. Its
//! tenant's tasks expire after a second in the queue (the tenant's queue TTL, and the
//! operator's most a task may ask for: `--max-task-queue-ttl-seconds 1`), so a followed
//! event or log stream ends within about two seconds, as it would for a task that ran.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::{LocalDispatcher, start_local_dispatcher_for, start_local_dispatcher_with};

async fn start() -> LocalDispatcher {
    start_local_dispatcher_with("sqlite://agent-bus.db", &["--roles", "api"]).await
}

fn checked_in() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[tokio::test]
async fn the_served_document_is_the_checked_in_one() {
    let dispatcher = start().await;
    let response = dispatcher
        .http
        .get(format!("{}/openapi.json", dispatcher.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let served: Value = response.json().await.unwrap();
    assert_eq!(served["openapi"], "3.0.3");
    assert!(
        served == checked_in(),
        "the served document (default limits) differs from docs/openapi.json; regenerate it with\n  \
         cargo run -p dispatcher -- openapi > docs/openapi.json"
    );
}

/// How many cases Schemathesis generates per operation and phase: about a minute and a
/// half on a 2-core machine.
const MAX_EXAMPLES: &str = "25";
/// The most the run may take before the test gives up on it.
const DEADLINE: Duration = Duration::from_mins(5);

#[tokio::test]
async fn schemathesis_finds_nothing_against_the_served_document() {
    testsupport::needs_env!(Var("AGENT_BUS_SCHEMATHESIS"));
    let st = std::env::var("AGENT_BUS_SCHEMATHESIS").unwrap();
    let dispatcher = start_local_dispatcher_for(
        "sqlite://agent-bus.db",
        &["--queue-ttl-seconds", "1"],
        &["--roles", "api", "--max-task-queue-ttl-seconds", "1"],
    )
    .await;
    let authorization = format!("Authorization: Bearer {}", dispatcher.key);
    let schema = format!("{}/openapi.json", dispatcher.base);
    let started = std::time::Instant::now();
    let run = tokio::process::Command::new(&st)
        .args([
            "run",
            &schema,
            "--url",
            &dispatcher.base,
            "--header",
            &authorization,
            "--max-examples",
            MAX_EXAMPLES,
            "--request-timeout",
            "5",
            "--workers",
            "2",
            "--no-color",
        ])
        // Hypothesis keeps its example database under the working folder.
        .current_dir(&dispatcher.dir)
        // `x-propertyNames` of the document as `propertyNames` (see the file).
        .env(
            "SCHEMATHESIS_HOOKS",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/schemathesis_hooks.py"),
        )
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(DEADLINE, run)
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran longer than {DEADLINE:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("schemathesis took {:.0} s", started.elapsed().as_secs_f64());
    assert!(
        output.status.success(),
        "schemathesis found problems (exit {:?}):\n{stdout}\n{stderr}",
        output.status.code()
    );
}
