//! An API server that answers 429: three launcher replicas behind a fault-injecting proxy
//! that refuses the first two creates of every Job with `429 Too Many Requests` and
//! `Retry-After: 1`, as API Priority and Fairness does. Every task is launched once,
//! each Job costs exactly three creates (one retry layer, the server's wait honoured, no
//! create multiplied by replicas), every create is counted in the launchers' metrics, and
//! no user sees a 5xx.
//!
//! And the real thing: three launchers whose identity API Priority and Fairness puts in
//! a priority level of five seats that rejects at once (plain-text 429, `Retry-After`
//! only in the header): the refusals are absorbed, every task launched once, and creates
//! stay within the launcher's tries per launch pass.

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

/// The sum of the samples of the counter `name` whose labels contain every one of `labels`.
fn counter_sum(metrics: &str, name: &str, labels: &[&str]) -> u64 {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

/// The sum of `agent_bus_kubernetes_requests_total` for Job creates answered `code`.
fn job_creates(metrics: &str, code: &str) -> u64 {
    let code = format!("code=\"{code}\"");
    counter_sum(
        metrics,
        "agent_bus_kubernetes_requests_total",
        &["verb=\"create\"", "resource=\"jobs\"", &code],
    )
}

/// Three `--roles launcher` replicas (`AGENT_BUS_INSTANCE` `{instance}-N`) that reach
/// Kubernetes through `kubeconfig`, each ready.
async fn start_launchers(
    setup: &Setup,
    kubeconfig: &str,
    instance: &str,
    args: &[&str],
) -> Vec<Dispatcher> {
    let mut launchers = Vec::new();
    for replica in 0..3 {
        let listen = format!("127.0.0.1:{}", testsupport::free_port());
        let metrics = format!("127.0.0.1:{}", testsupport::free_port());
        let mut command = vec![
            "serve",
            "--roles",
            "launcher",
            "--executor",
            "kubernetes",
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics,
        ];
        command.extend_from_slice(args);
        let child = setup
            .command(&command)
            .env("KUBECONFIG", kubeconfig)
            .env("AGENT_BUS_INSTANCE", format!("{instance}-{replica}"))
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
        crate::common::wait_until_ready(&launcher.http, &launcher.base, CLUSTER_TIMEOUT).await;
        launchers.push(launcher);
    }
    launchers
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
        let launchers = start_launchers(
            &setup,
            kubeconfig,
            "launcher",
            &["--reconcile-interval", "1", "--launching-stale-after", "60"],
        )
        .await;

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

/// The launchers' Job creates counted in their metrics, by answer.
#[derive(Debug, Default)]
struct Creates {
    created: u64,
    refused: u64,
    all: u64,
    transient_launches: u64,
}

async fn launcher_creates(launchers: &[Dispatcher]) -> Creates {
    let mut creates = Creates::default();
    for launcher in launchers {
        let text = scrape(&launcher.http, &launcher.metrics).await;
        creates.created += job_creates(&text, "201");
        creates.refused += job_creates(&text, "429");
        creates.all += counter_sum(
            &text,
            "agent_bus_kubernetes_requests_total",
            &["verb=\"create\"", "resource=\"jobs\""],
        );
        creates.transient_launches += counter_sum(
            &text,
            "agent_bus_launch_failures_total",
            &["kind=\"transient\""],
        );
    }
    creates
}

/// The objects that put one identity behind a priority level of a few seats that
/// rejects at once: a FlowSchema matching `group`, its PriorityLevelConfiguration, and a
/// ClusterRoleBinding giving the group what a launcher needs. Cluster-scoped, so named
/// after the test's namespace and deleted by [`PriorityLevel::delete`].
struct PriorityLevel {
    client: kube::Client,
    name: String,
    uid: String,
}

impl PriorityLevel {
    async fn create(client: &kube::Client, name: &str, group: &str) -> Self {
        use k8s_openapi::api::flowcontrol::v1::{FlowSchema, PriorityLevelConfiguration};
        use k8s_openapi::api::rbac::v1::ClusterRoleBinding;

        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
        }))
        .unwrap();
        // One share of the server's 1,200 seats among the default levels' 245: five
        // seats, none lent or borrowed, and a request without one is refused at once.
        let level: PriorityLevelConfiguration = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"type": "Limited", "limited": {
                "nominalConcurrencyShares": 1, "lendablePercent": 0, "borrowingLimitPercent": 0,
                "limitResponse": {"type": "Reject"},
            }},
        }))
        .unwrap();
        let schema: FlowSchema = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "priorityLevelConfiguration": {"name": name},
                "matchingPrecedence": 500,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [{
                    "subjects": [{"kind": "Group", "group": {"name": group}}],
                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "namespaces": ["*"], "clusterScope": true}],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                }],
            },
        }))
        .unwrap();
        let post = PostParams::default();
        kube::Api::<ClusterRoleBinding>::all(client.clone())
            .create(&post, &binding)
            .await
            .unwrap();
        let level = kube::Api::<PriorityLevelConfiguration>::all(client.clone())
            .create(&post, &level)
            .await
            .unwrap();
        kube::Api::<FlowSchema>::all(client.clone())
            .create(&post, &schema)
            .await
            .unwrap();
        Self {
            client: client.clone(),
            name: name.to_owned(),
            uid: level.metadata.uid.unwrap(),
        }
    }

    /// Waits until the API server classifies `client`'s requests into this level (its
    /// configuration controller takes the new objects in asynchronously); the answer's
    /// `X-Kubernetes-PF-PriorityLevel-UID` says which level served it.
    async fn wait_until_it_serves(&self, client: &kube::Client, namespace: &str) {
        poll_until(
            "requests classified into the test's priority level",
            CLUSTER_TIMEOUT,
            || async {
                let request = http::Request::get(format!("/api/v1/namespaces/{namespace}"))
                    .body(kube::client::Body::empty())
                    .unwrap();
                let response = client.send(request).await.map_err(|e| e.to_string())?;
                let level = response
                    .headers()
                    .get("x-kubernetes-pf-prioritylevel-uid")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                if level == self.uid {
                    Ok(())
                } else {
                    Err(format!("served by priority level {level:?}"))
                }
            },
        )
        .await;
    }

    async fn delete(self) {
        use k8s_openapi::api::flowcontrol::v1::{FlowSchema, PriorityLevelConfiguration};
        use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
        let delete = DeleteParams::default();
        let _ = kube::Api::<FlowSchema>::all(self.client.clone())
            .delete(&self.name, &delete)
            .await;
        let _ = kube::Api::<PriorityLevelConfiguration>::all(self.client.clone())
            .delete(&self.name, &delete)
            .await;
        let _ = kube::Api::<ClusterRoleBinding>::all(self.client.clone())
            .delete(&self.name, &delete)
            .await;
    }
}

/// The test's kubeconfig with every user impersonating `user` in `group` (kube-client
/// sends `Impersonate-User` and `Impersonate-Group`; Priority and Fairness classifies the
/// request as the impersonated identity).
fn impersonating_kubeconfig(dir: &std::path::Path, user: &str, group: &str) -> std::path::PathBuf {
    let path = std::env::var("KUBECONFIG").unwrap();
    let mut kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    for named in &mut kubeconfig.auth_infos {
        let auth = named.auth_info.get_or_insert_with(Default::default);
        auth.impersonate = Some(user.to_owned());
        auth.impersonate_groups = Some(vec![group.to_owned()]);
    }
    let out = dir.join("kubeconfig-impersonating");
    // JSON is YAML: kube-client and kubectl read it as a kubeconfig.
    std::fs::write(&out, serde_json::to_vec(&kubeconfig).unwrap()).unwrap();
    out
}

/// Tasks submitted per wave; waves go on until the API server has refused a create.
const WAVE: usize = 60;
const MAX_WAVES: usize = 5;
/// The launcher's tries per launch (`launcher::kubernetes::TRANSIENT_ATTEMPTS`).
const TRIES_PER_LAUNCH: u64 = 5;

#[tokio::test]
async fn launchers_behind_priority_and_fairness_absorb_its_429s_and_lose_nothing() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-apf", |setup| async move {
        let key = setup.tenant("acme").await;
        let admin = testsupport::kube_client().await.unwrap();
        let name = format!("agent-bus-{}", setup.ns.name);
        let group = format!("agent-bus-apf:{}", setup.ns.name);
        let level = PriorityLevel::create(&admin, &name, &group).await;
        let dir = std::env::temp_dir().join(&setup.ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = impersonating_kubeconfig(&dir, "agent-bus-apf-launcher", &group);
        let impersonating = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .unwrap(),
        )
        .unwrap();
        level.wait_until_it_serves(&impersonating, &setup.ns.name).await;
        let kubeconfig = kubeconfig.to_str().unwrap();

        // The api and the watcher are the cluster's admin (exempt); three launchers
        // share the five seats, far fewer than their creates in flight.
        let api = setup
            .start_with("api-and-watcher", &["--roles", "api,watcher", KEEP_JOBS[0], KEEP_JOBS[1]])
            .await;
        let launchers = start_launchers(
            &setup,
            kubeconfig,
            "apf-launcher",
            &[
                "--launch-concurrency",
                "16",
                "--reconcile-interval",
                "1",
                "--launching-stale-after",
                "20",
            ],
        )
        .await;

        // Waves of submits, all at once, until the server has said 429 at least once.
        let mut ids = Vec::new();
        for wave in 0..MAX_WAVES {
            let submits = (0..WAVE).map(|n| {
                let body = json!({"name": format!("apf-{wave}-{n}"), "image": "busybox:1.36", "command": ["true"]});
                let api = &api;
                let key = &key;
                async move { api.post(key, "/v1/tasks", &body, None).await }
            });
            for (status, task) in futures::future::join_all(submits).await {
                assert_eq!(status, 201, "no user sees an error: {task}");
                ids.push(task["id"].as_str().unwrap().to_owned());
            }
            let wave_ids = ids[ids.len() - WAVE..].to_vec();
            poll_until("the wave launched or a create refused", CLUSTER_TIMEOUT, || async {
                if launcher_creates(&launchers).await.refused > 0 {
                    return Ok(());
                }
                for id in &wave_ids {
                    let task = api.get(&key, &format!("/v1/tasks/{id}")).await;
                    if matches!(task["state"].as_str(), Some("queued" | "launching")) {
                        return Err(format!("task {id} is {}", task["state"]));
                    }
                }
                Ok(())
            })
            .await;
            if launcher_creates(&launchers).await.refused > 0 {
                break;
            }
        }

        for id in &ids {
            let task = api.wait_for_state(&key, id, &["succeeded", "failed"]).await;
            assert_eq!(task["state"], "succeeded", "{task}");
            assert_eq!(task["attempt"], 1, "{task}");
            assert_eq!(jobs_of(&setup.ns, id).await.len(), 1, "task {id}");
        }
        let creates = launcher_creates(&launchers).await;
        eprintln!("{} tasks: {creates:?}", ids.len());
        assert!(creates.refused > 0, "the priority level never refused a create: {creates:?}");
        assert_eq!(creates.created, ids.len() as u64, "one Job made per task: {creates:?}");
        // Each launch pass tries at most five times; a pass that gives up is counted,
        // and the reconciler's next pass is the only other source of creates.
        let passes = ids.len() as u64 + creates.transient_launches;
        assert!(
            creates.all <= TRIES_PER_LAUNCH * passes,
            "creates unbounded: {creates:?} for {passes} launch passes"
        );
        level.delete().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
