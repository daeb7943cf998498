//! An API server that answers 429: three launcher replicas behind a fault-injecting proxy
//! that refuses the first two creates of every Job with `429 Too Many Requests` and
//! `Retry-After: 1`, as API Priority and Fairness does. Every task is launched once,
//! each Job costs exactly three creates (one retry layer, the server's wait honoured, no
//! create multiplied by replicas), every create is counted in the launchers' metrics, and
//! no user sees a 5xx.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::*;
use crate::common::scrape;

/// Creates of one Job the proxy refuses before it lets one through.
const REFUSED_PER_JOB: usize = 2;
/// Tasks submitted at once: far more creates than the proxy accepts at first.
const TASKS: usize = 24;

/// What the proxy saw: every Job create, by Job name, with when it came.
#[derive(Default)]
struct Seen {
    creates: BTreeMap<String, Vec<Instant>>,
}

#[derive(Clone)]
struct Proxy {
    cluster: kube::Client,
    seen: Arc<Mutex<Seen>>,
}

/// Forwards every request to the API server, except the first [`REFUSED_PER_JOB`]
/// creates of each Job, which it answers as an API server out of capacity does.
async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20).await.unwrap();
    let is_job_create = parts.method == http::Method::POST && parts.uri.path().ends_with("/jobs");
    if is_job_create {
        let job: Value = serde_json::from_slice(&bytes).unwrap();
        let name = job["metadata"]["name"].as_str().unwrap().to_owned();
        let refuse = {
            let mut seen = proxy.seen.lock().unwrap();
            let creates = seen.creates.entry(name).or_default();
            creates.push(Instant::now());
            creates.len() <= REFUSED_PER_JOB
        };
        if refuse {
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "TooManyRequests", "code": 429,
                "message": "Too many requests, please try again later.",
                "details": {"retryAfterSeconds": 1},
            });
            return (
                http::StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1"), ("content-type", "application/json")],
                status.to_string(),
            )
                .into_response();
        }
    }
    let mut upstream = http::Request::builder()
        .method(parts.method)
        .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    for (name, value) in &parts.headers {
        if name != http::header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream
        .body(kube::client::Body::from(bytes.to_vec()))
        .unwrap();
    match proxy.cluster.send(upstream).await {
        Ok(response) => response.map(Body::new),
        Err(error) => (http::StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}

/// Serves the proxy on a free port: its URL.
async fn start_proxy(proxy: Proxy) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

/// A kubeconfig whose only cluster is the proxy (plain HTTP on loopback; the proxy
/// authenticates upstream as the test's admin).
fn proxy_kubeconfig(dir: &std::path::Path, server: &str, namespace: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: {server}\n\
             users:\n- name: anonymous\n  user: {{}}\ncontexts:\n- name: proxy\n  context:\n    \
             cluster: proxy\n    user: anonymous\n    namespace: {namespace}\ncurrent-context: proxy\n"
        ),
    )
    .unwrap();
    path
}

/// The sum of `agent_bus_kubernetes_requests_total` for Job creates answered `code`.
fn job_creates(metrics: &str, code: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("agent_bus_kubernetes_requests_total{"))
        .filter(|line| {
            line.contains("verb=\"create\"")
                && line.contains("resource=\"jobs\"")
                && line.contains(&format!("code=\"{code}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

#[tokio::test]
async fn three_launchers_behind_an_api_server_answering_429_create_each_job_once() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-throttled", |setup| async move {
        let key = setup.tenant("acme").await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let cluster = testsupport::kube_client().await.unwrap();
        let server = start_proxy(Proxy {
            cluster,
            seen: seen.clone(),
        })
        .await;
        let dir = std::env::temp_dir().join(&setup.ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = proxy_kubeconfig(&dir, &server, &setup.ns.name);
        let kubeconfig = kubeconfig.to_str().unwrap();

        // The api and the watcher talk to the API server directly; three launchers only
        // through the proxy. A launch waits out the 429s (two seconds), far less than the
        // stale-claim period, so a relaunch never doubles a create here.
        let api = setup
            .start_with(
                "api-and-watcher",
                &["--roles", "api,watcher", KEEP_JOBS[0], KEEP_JOBS[1]],
            )
            .await;
        let mut launchers = Vec::new();
        for replica in 0..3 {
            let listen = format!("127.0.0.1:{}", testsupport::free_port());
            let metrics = format!("127.0.0.1:{}", testsupport::free_port());
            let child = setup
                .command(&[
                    "serve",
                    "--roles",
                    "launcher",
                    "--executor",
                    "kubernetes",
                    "--listen",
                    &listen,
                    "--metrics-listen",
                    &metrics,
                    "--reconcile-interval",
                    "1",
                    "--launching-stale-after",
                    "60",
                ])
                .env("KUBECONFIG", kubeconfig)
                .env("AGENT_BUS_INSTANCE", format!("launcher-{replica}"))
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let launcher = Dispatcher {
                child,
                base: format!("http://{listen}"),
                metrics: format!("http://{metrics}"),
                http: reqwest::Client::new(),
            };
            crate::common::wait_until_ready(&launcher.http, &launcher.base, CLUSTER_TIMEOUT)
                .await;
            launchers.push(launcher);
        }

        let mut ids = Vec::new();
        for n in 0..TASKS {
            let body = json!({"name": format!("throttled-{n}"), "image": "busybox:1.36", "command": ["true"]});
            let (status, task) = api.post(&key, "/v1/tasks", &body, None).await;
            assert_eq!(status, 201, "{task}");
            ids.push(task["id"].as_str().unwrap().to_owned());
        }
        for id in &ids {
            let task = api.wait_for_state(&key, id, &["succeeded", "failed"]).await;
            assert_eq!(task["state"], "succeeded", "{task}");
            assert_eq!(task["attempt"], 1, "{task}");
        }

        let seen = std::mem::take(&mut *seen.lock().unwrap());
        assert_eq!(seen.creates.len(), TASKS, "one Job name per task");
        for (job, creates) in &seen.creates {
            assert_eq!(
                creates.len(),
                REFUSED_PER_JOB + 1,
                "job {job}: two refused, one created, nothing more"
            );
            for pair in creates.windows(2) {
                let waited = pair[1].duration_since(pair[0]);
                assert!(
                    waited >= std::time::Duration::from_millis(900),
                    "job {job}: created again after {waited:?}, before the server's Retry-After"
                );
            }
        }
        for id in &ids {
            assert_eq!(jobs_of(&setup.ns, id).await.len(), 1, "task {id}");
        }
        // Every create is counted by the launcher that sent it.
        let (mut refused, mut created) = (0, 0);
        for launcher in &launchers {
            let text = scrape(&launcher.http, &launcher.metrics).await;
            refused += job_creates(&text, "429");
            created += job_creates(&text, "201");
        }
        assert_eq!(refused, (REFUSED_PER_JOB * TASKS) as u64);
        assert_eq!(created, TASKS as u64);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
