//! Shared set-up of the dispatcher's integration tests: an API over a fresh database
//! (PostgreSQL from the test environment, or an SQLite file) and tenants with keys.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use dispatcher::metrics::snapshot::SnapshotConfig;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use dispatcher::api::admission::Admission;
use dispatcher::api::event_feed::EventFeed;
use dispatcher::api::readiness::Readiness;
use dispatcher::api::streams::OpenStreams;
use dispatcher::api::{self, AppState, ExposeSecret as _, ReportLimits};
use dispatcher::cost::Prices;
use dispatcher::launcher::job_spec::LaunchConfig;
use dispatcher::launcher::{Canceller, LocalExecutor};
use dispatcher::lifecycle::Lifecycle;
use dispatcher::metrics::Metrics;
use dispatcher::queue::{MemoryQueue, Queue};
use dispatcher::report::ReportTokens;
use dispatcher::secrets::{LocalSecrets, SecretStore};
use dispatcher::store::Store;
use dispatcher::task::TaskState;
use dispatcher::task::lifecycle::{Ending, Move};
use dispatcher::task::submission::Limits;
use serde_json::Value;
use tower::ServiceExt as _;

/// An API under test and what it stands on.
#[derive(Clone)]
pub(crate) struct TestApi {
    /// The api's listener.
    pub router: Router,
    /// The metrics listener (`/metrics` and the probes).
    pub metrics_router: Router,
    pub store: Store,
    pub queue: Queue,
    pub state: AppState,
}

/// The report-token key of test APIs, so tests can mint tokens the API accepts.
pub(crate) const TEST_REPORT_KEY: &[u8] = b"agent-bus test report key, 32+ bytes long";

/// The submission limits of test APIs: the defaults, with `example.com/` labels and
/// annotations allowed (the defaults allow none), as the cluster tests' dispatchers.
pub(crate) fn test_limits() -> Limits {
    Limits {
        label_prefixes: vec!["example.com/".parse().unwrap()],
        annotation_prefixes: vec!["example.com/".parse().unwrap()],
        ..Limits::default()
    }
}

/// Builds the API on `store`, with an in-process queue and the local canceller.
pub(crate) async fn api_on(store: Store, configure: impl FnOnce(&mut AppState)) -> TestApi {
    store.migrate().await.unwrap();
    let queue = Queue::from(MemoryQueue::new());
    let workdir =
        std::env::temp_dir().join(format!("agent-bus-test-{}", uuid::Uuid::new_v4().simple()));
    let metrics = Metrics::default();
    let store = store.observed_by(Arc::new(metrics.clone()));
    let lifecycle = Lifecycle::new(store.clone(), metrics, Prices::default());
    let mut state = AppState {
        lifecycle: lifecycle.clone(),
        queue: queue.clone(),
        limits: Arc::new(test_limits()),
        launch: Arc::new(LaunchConfig::default()),
        canceller: Canceller::Local(LocalExecutor::new(lifecycle, workdir.clone())),
        cluster: None,
        secrets: SecretStore::Local(LocalSecrets::open(workdir.join("secrets")).unwrap()),
        max_body_bytes: 64 * 1024,
        follow_poll: Duration::from_millis(50),
        event_feed: EventFeed::new(store.clone(), Duration::from_millis(50)),
        list_page_max_bytes: dispatcher::api::task_list::DEFAULT_PAGE_MAX_BYTES,
        report_tokens: ReportTokens::new(TEST_REPORT_KEY),
        snapshot: Arc::new(SnapshotConfig {
            max_age: Duration::ZERO,
            ..SnapshotConfig::default()
        }),
        reports: ReportLimits::default(),
        // Every `/readyz` checks again: tests change dependencies under it.
        readiness: Arc::new(Readiness::new(Duration::ZERO)),
        admission: Admission::default(),
        streams: Arc::new(OpenStreams::default()),
    };
    configure(&mut state);
    TestApi {
        router: api::router(state.clone()),
        metrics_router: api::metrics_router(state.clone()),
        store,
        queue,
        state,
    }
}

/// A test database: its store and the URL it was opened with (for a connection of its
/// own, or a second process).
pub(crate) struct Db {
    pub store: Store,
    pub url: String,
}

impl From<Db> for Store {
    fn from(db: Db) -> Self {
        db.store
    }
}

/// A fresh SQLite database in a temporary file.
pub(crate) async fn sqlite_db() -> Db {
    let path = std::env::temp_dir().join(format!(
        "agent-bus-test-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    let url = format!("sqlite://{}", path.display());
    let store = Store::connect(&url, 4).await.unwrap();
    Db { store, url }
}

/// Runs each `case` once on a fresh PostgreSQL database and once on an SQLite file. A case
/// takes a [`Db`] or a [`Store`] (anything a `Db` converts into). The PostgreSQL half
/// needs the test environment (`DATABASE_URL`) and skips without it; the SQLite half
/// always runs.
#[allow(unused_macros)]
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    testsupport::needs_env!(Postgres);
                    testsupport::with_database(|db| async move {
                        let store = dispatcher::store::Store::connect(&db.url, 8).await.unwrap();
                        let db = crate::common::Db { store, url: db.url.clone() };
                        super::$case(db.into()).await;
                    })
                    .await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(crate::common::sqlite_db().await.into()).await;
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_stores;

impl TestApi {
    /// What moves this API's tasks (and counts and prices the moves).
    pub(crate) fn lifecycle(&self) -> &Lifecycle {
        &self.state.lifecycle
    }

    /// Creates a tenant and returns its API key.
    pub(crate) async fn tenant(&self, name: &str, max_queued: u32) -> String {
        let key = api::new_api_key().expose_secret().to_owned();
        self.store
            .create_tenant(name, &api::hash_api_key(&key), max_queued)
            .await
            .unwrap();
        key
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = match body {
            Some(body) => request
                .header("content-type", "application/json")
                .body(Body::from(body.to_owned())),
            None => request.body(Body::empty()),
        }
        .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, headers, value)
    }

    pub(crate) async fn submit(&self, key: &str, body: &Value) -> (StatusCode, Value) {
        let (status, _, value) = self
            .call(
                Method::POST,
                "/v1/tasks",
                Some(key),
                Some(&body.to_string()),
                &[],
            )
            .await;
        (status, value)
    }

    pub(crate) async fn get(&self, key: &str, uri: &str) -> (StatusCode, Value) {
        let (status, _, value) = self.call(Method::GET, uri, Some(key), None, &[]).await;
        (status, value)
    }
}

/// A minimal valid submission.
pub(crate) fn task_body(name: &str) -> Value {
    serde_json::json!({"name": name, "image": "busybox:1.36", "command": ["true"]})
}

/// The text of `GET {metrics}/metrics` on a dispatcher's metrics listener, which must
/// answer 200 (so an assertion on its lines can never pass on an error page).
pub(crate) async fn scrape(http: &reqwest::Client, metrics: &str) -> String {
    let response = http.get(format!("{metrics}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {metrics}/metrics");
    response.text().await.unwrap()
}

/// A `dispatcher serve --executor local` process in a fresh working folder, with tenant
/// `acme` created first.
pub(crate) struct LocalDispatcher {
    pub child: tokio::process::Child,
    pub dir: std::path::PathBuf,
    /// The api's listener.
    pub base: String,
    /// The metrics listener (`/metrics` and the probes).
    pub metrics: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl LocalDispatcher {
    /// Submits `body` with `key`, expecting 201; the new task's id.
    pub(crate) async fn submit_as(&self, key: &str, body: &Value) -> String {
        let response = self
            .http
            .post(format!("{}/v1/tasks", self.base))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `GET path` with `key`, as JSON.
    pub(crate) async fn get_as(&self, key: &str, path: &str) -> Result<Value, String> {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())
    }
}

/// `dispatcher ARGS` in `dir` on the SQLite file there: (success, stdout, stderr).
pub(crate) async fn run_dispatcher(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(args)
        .current_dir(dir)
        .env("AGENT_BUS_LOG", "warn")
        .env("DATABASE_URL", "sqlite://agent-bus.db")
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    )
}

/// Starts a local-executor dispatcher on `database_url`, with none of the test
/// environment's Redis or cluster variables, and waits until `/readyz` answers 200.
pub(crate) async fn start_local_dispatcher(database_url: &str) -> LocalDispatcher {
    start_local_dispatcher_with(database_url, &[]).await
}

/// [`start_local_dispatcher`] with more `serve` flags (`--roles api`, …).
pub(crate) async fn start_local_dispatcher_with(
    database_url: &str,
    serve_flags: &[&str],
) -> LocalDispatcher {
    start_local_dispatcher_for(database_url, &[], serve_flags).await
}

/// [`start_local_dispatcher_with`], its tenant `acme` made with `tenant_flags` too
/// (`--queue-ttl-seconds 1`, …).
pub(crate) async fn start_local_dispatcher_for(
    database_url: &str,
    tenant_flags: &[&str],
    serve_flags: &[&str],
) -> LocalDispatcher {
    let dir =
        std::env::temp_dir().join(format!("agent-bus-local-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let command = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"));
        command
            .args(args)
            .current_dir(&dir)
            .env("AGENT_BUS_LOG", "warn")
            .env("DATABASE_URL", database_url)
            .env_remove("REDIS_URL")
            .env_remove("KUBECONFIG");
        command
    };
    let output = command(&[&["tenant", "create", "acme"], tenant_flags].concat())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let port = testsupport::free_port();
    let listen = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", testsupport::free_port());
    let mut serve = vec![
        "serve",
        "--executor",
        "local",
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics,
    ];
    serve.extend_from_slice(serve_flags);
    let child = command(&serve)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let dispatcher = LocalDispatcher {
        child,
        dir,
        base: format!("http://127.0.0.1:{port}"),
        metrics: format!("http://{metrics}"),
        key,
        http: reqwest::Client::new(),
    };
    wait_until_ready(&dispatcher.http, &dispatcher.base, Duration::from_secs(30)).await;
    dispatcher
}

/// Waits until the dispatcher at `base` answers `GET /readyz` with 200, up to `timeout`.
pub(crate) async fn wait_until_ready(http: &reqwest::Client, base: &str, timeout: Duration) {
    testsupport::poll_until("the dispatcher to be ready", timeout, || async {
        match http.get(format!("{base}/readyz")).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("{}", response.status())),
            Err(error) => Err(error.to_string()),
        }
    })
    .await;
}

/// The move that takes a task from `from` to `to`, as the launcher, the watcher or the
/// local executor would make it.
pub(crate) fn move_between(from: TaskState, to: TaskState) -> Move {
    match (from, to) {
        (TaskState::Queued, TaskState::Launching) => Move::Claim,
        (_, TaskState::Launched) => Move::Launched,
        (_, TaskState::Running) => Move::Started,
        (_, TaskState::Cancelled) => Move::Cancel,
        (_, ended) => Move::Ended(Ending::new(ended)),
    }
}
