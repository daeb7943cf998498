//! RBAC and admission on the dev overlay: the overlays' dry-run, what the dispatcher's
//! ServiceAccount may do, and the `restricted` tasks namespace.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::support::*;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use testsupport::{
    CLUSTER_TIMEOUT, kube_client, poll_until, unique_suffix, with_database, with_namespace,
    with_redis_keyspace,
};

// --- RBAC and admission, on the dev overlay ------------------------------------------------------

/// What the dispatcher's ServiceAccount may and may not do (`kubectl auth can-i`).
pub(crate) fn assert_rbac(names: &Names) {
    let sa = names.service_account();
    let can = |args: &[&str]| -> String {
        let mut all = vec!["auth", "can-i"];
        all.extend(args);
        all.extend(["--as", &sa]);
        run_status(tool("kubectl"), &all, None)
            .stdout
            .trim()
            .to_owned()
    };
    let (d, t) = (names.dispatcher.as_str(), names.tasks.as_str());
    let expectations: &[(&[&str], &str)] = &[
        (&["create", "jobs.batch", "-n", t], "yes"),
        (&["get", "jobs.batch", "-n", t], "yes"),
        (&["list", "jobs.batch", "-n", t], "yes"),
        (&["watch", "jobs.batch", "-n", t], "yes"),
        (&["delete", "jobs.batch", "-n", t], "yes"),
        (&["watch", "pods", "-n", t], "yes"),
        (&["get", "pods", "--subresource=log", "-n", t], "yes"),
        (&["list", "events", "-n", t], "yes"),
        // The tenants' secrets, in the tasks namespace only.
        (&["get", "secrets", "-n", t], "yes"),
        (&["list", "secrets", "-n", t], "yes"),
        (&["create", "secrets", "-n", t], "yes"),
        (&["update", "secrets", "-n", t], "yes"),
        (&["delete", "secrets", "-n", t], "yes"),
        (&["get", "leases.coordination.k8s.io", "-n", d], "yes"),
        (&["create", "leases.coordination.k8s.io", "-n", d], "yes"),
        (&["update", "leases.coordination.k8s.io", "-n", d], "yes"),
        // Nothing else.
        (&["watch", "secrets", "-n", t], "no"),
        (&["patch", "secrets", "-n", t], "no"),
        (&["deletecollection", "secrets", "-n", t], "no"),
        (&["get", "secrets", "-n", d], "no"),
        (&["list", "secrets", "-n", d], "no"),
        (&["create", "secrets", "-n", d], "no"),
        (&["get", "secrets", "-n", "default"], "no"),
        (&["list", "secrets", "--all-namespaces"], "no"),
        (&["create", "pods", "--subresource=exec", "-n", t], "no"),
        (&["get", "pods", "--subresource=exec", "-n", t], "no"),
        (&["create", "pods", "-n", t], "no"),
        (&["update", "jobs.batch", "-n", t], "no"),
        (&["patch", "jobs.batch", "-n", t], "no"),
        (&["create", "jobs.batch", "-n", d], "no"),
        (&["create", "jobs.batch", "-n", "default"], "no"),
        (&["list", "jobs.batch", "--all-namespaces"], "no"),
        (&["delete", "leases.coordination.k8s.io", "-n", d], "no"),
        (&["create", "leases.coordination.k8s.io", "-n", t], "no"),
        (
            &["create", "rolebindings.rbac.authorization.k8s.io", "-n", t],
            "no",
        ),
    ];
    let mut wrong = Vec::new();
    for (args, expected) in expectations {
        let answer = can(args);
        if answer != *expected {
            wrong.push(format!(
                "can-i {}: {answer}, expected {expected}",
                args.join(" ")
            ));
        }
    }
    assert!(wrong.is_empty(), "{sa}:\n{}", wrong.join("\n"));
}

#[tokio::test]
async fn the_overlays_pass_a_server_side_dry_run() {
    testsupport::needs_env!(Cluster, Program("kubectl"));
    ensure_crds();
    for overlay in ["dev", "staging", "prod"] {
        let names = Names::unique(&format!("deploy-kust-{overlay}"));
        let rendered = kustomize(overlay, &names);
        // The default names are gone from every place a namespace is named.
        for default in ["agent-bus", "agent-bus-tasks"] {
            for place in ["namespace: ", "kubernetes.io/metadata.name: "] {
                let left = format!("{place}{default}\n");
                assert!(
                    !rendered.contains(&left),
                    "{overlay}: `{}` escaped the replacement",
                    left.trim()
                );
            }
        }
        let outcome = std::panic::catch_unwind(|| server_side_dry_run(&rendered, &names));
        delete_namespaces(&names);
        let items = outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        for name in ["agent-bus-api", "agent-bus-launcher", "agent-bus-watcher"] {
            let container = dispatcher_container(find(&items, "Deployment", name)).unwrap();
            let value = |var: &str| env_value(container, var);
            assert_eq!(
                value("AGENT_BUS_NAMESPACE"),
                names.tasks,
                "{overlay} {name}"
            );
            assert_eq!(
                value("AGENT_BUS_LEASE_NAMESPACE"),
                names.dispatcher,
                "{overlay} {name}"
            );
            assert_eq!(
                value("AGENT_BUS_REPORT_URL"),
                format!("http://agent-bus-api.{}.svc:8080", names.dispatcher),
                "{overlay} {name}"
            );
        }
        let kinds: Vec<&str> = items.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        let expected: &[&str] = if overlay == "dev" {
            &["StatefulSet", "Secret"]
        } else {
            &[
                "ExternalSecret",
                "ServiceMonitor",
                "PrometheusRule",
                "Ingress",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "PersistentVolumeClaim",
            ]
        };
        for kind in expected.iter().chain(&[
            "Deployment",
            "Role",
            "RoleBinding",
            "NetworkPolicy",
            "ResourceQuota",
            "LimitRange",
        ]) {
            assert!(kinds.contains(kind), "{overlay}: no {kind} in {kinds:?}");
        }
    }
}

/// Applies the dev overlay for real into `names`.
pub(crate) fn apply_dev_overlay(names: &Names) -> String {
    let rendered = kustomize("dev", names);
    create_namespaces(&rendered, names);
    let out = kubectl(&["apply", "-f", "-"], Some(&rendered));
    assert!(!out.stderr.contains("Warning"), "{}", out.stderr);
    rendered
}

#[tokio::test]
async fn the_dispatchers_service_account_may_do_what_it_needs_and_nothing_more() {
    testsupport::needs_env!(Cluster, Program("kubectl"));
    let names = Names::unique("deploy-rbac");
    with_installation(
        &names,
        || {},
        || async {
            apply_dev_overlay(&names);
            assert_rbac(&names);
        },
    )
    .await;
}

/// A kubeconfig that authenticates as the dispatcher's ServiceAccount, with a token from
/// the TokenRequest API, so the dispatcher below runs with exactly the Role's permissions.
pub(crate) fn service_account_kubeconfig(names: &Names, dir: &Path) -> PathBuf {
    let token = kubectl(
        &[
            "create",
            "token",
            "agent-bus",
            "-n",
            &names.dispatcher,
            "--duration",
            "1h",
        ],
        None,
    )
    .stdout
    .trim()
    .to_owned();
    let server = kubectl(
        &[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ],
        None,
    )
    .stdout;
    let ca = kubectl(
        &[
            "config",
            "view",
            "--minify",
            "--raw",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority}",
        ],
        None,
    )
    .stdout;
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "dispatcher", "user": {"token": token}}],
        "contexts": [{"name": "dispatcher", "context": {"cluster": "test", "user": "dispatcher", "namespace": names.tasks}}],
        "current-context": "dispatcher",
    });
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_json::to_string(&kubeconfig).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn the_restricted_tasks_namespace_refuses_unhardened_pods_and_admits_the_dispatchers_jobs() {
    testsupport::needs_env!(Cluster, Postgres, Redis, Program("kubectl"));
    let names = Names::unique("deploy-admit");
    with_installation(&names, || {}, || async {
        let names = &names;
        let rendered = objects(&apply_dev_overlay(names));
        // The dispatcher below gets the launcher's settings as the overlay renders them.
        let launcher = dispatcher_container(find(&rendered, "Deployment", "agent-bus-launcher")).unwrap();
        let report_url = env_value(launcher, "AGENT_BUS_REPORT_URL").to_owned();
        let runner_image = env_value(launcher, "AGENT_BUS_RUNNER_IMAGE").to_owned();
        let placement = config_map(&rendered)["data"]["placement.yaml"].as_str().unwrap().to_owned();
        let (report_url, runner_image, placement) = (&report_url, &runner_image, &placement);
        let client = kube_client().await.unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &names.tasks);

        // A pod the baseline profile admits but restricted refuses: PodSecurity says no here...
        let unhardened: Pod = serde_json::from_value(json!({
            "metadata": {"name": "unhardened"},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1"}]}
        }))
        .unwrap();
        let refused = pods.create(&PostParams::default(), &unhardened).await.unwrap_err().to_string();
        assert!(refused.contains("violates PodSecurity \"restricted:latest\""), "{refused}");
        // ...and the same pod is admitted in a namespace without the label, so the label is
        // what refuses it.
        with_namespace("deploy-unlabelled", |ns| async move {
            let dry_run = PostParams { dry_run: true, ..PostParams::default() };
            ns.api::<Pod>().create(&dry_run, &unhardened).await.unwrap();
        })
        .await;
        // A privileged pod is refused too. (This test API server also runs with
        // --allow-privileged=false, which refuses it before PodSecurity is asked.)
        let privileged: Pod = serde_json::from_value(json!({
            "metadata": {"name": "privileged"},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1", "securityContext": {"privileged": true}}]}
        }))
        .unwrap();
        let refused = pods.create(&PostParams::default(), &privileged).await.unwrap_err().to_string();
        assert!(refused.contains("privileged"), "{refused}");

        // The real dispatcher, as its ServiceAccount, launches a task into the namespace.
        with_database(|db| async move {
            with_redis_keyspace(|redis| async move {
                let dir = std::env::temp_dir().join(format!("agent-bus-deploy-{}", unique_suffix()));
                std::fs::create_dir_all(&dir).unwrap();
                let kubeconfig = service_account_kubeconfig(names, &dir);
                let placement_file = dir.join("placement.yaml");
                std::fs::write(&placement_file, placement).unwrap();
                let command = |args: &[&str]| {
                    let mut command = tokio::process::Command::new(dispatcher_binary());
                    command
                        .args(args)
                        .env("KUBECONFIG", &kubeconfig)
                        .env("DATABASE_URL", &db.url)
                        .env("REDIS_URL", &redis.url)
                        .env("AGENT_BUS_REDIS_PREFIX", &redis.prefix)
                        .env("AGENT_BUS_NAMESPACE", &names.tasks)
                        .env("AGENT_BUS_LEASE_NAMESPACE", &names.dispatcher)
                        .env("AGENT_BUS_INSTANCE", "deploy-test")
                        .env("AGENT_BUS_PLACEMENT_FILE", &placement_file)
                        .env("AGENT_BUS_REPORT_URL", report_url)
                        .env("AGENT_BUS_RUNNER_IMAGE", runner_image)
                        .env("AGENT_BUS_LOG", "warn")
                        // The Job and pod are read after the outcome below.
                        .env("AGENT_BUS_KEEP_FINISHED_JOBS", "10m")
                        .kill_on_drop(true);
                    command
                };
                let key = command(&["tenant", "create", "acme"]).stderr(Stdio::inherit()).output().await.unwrap();
                assert!(key.status.success());
                let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();
                let listen = format!("127.0.0.1:{}", testsupport::free_port());
                let metrics_listen = format!("127.0.0.1:{}", testsupport::free_port());
                let _dispatcher = command(&["serve", "--executor", "kubernetes", "--listen", &listen, "--metrics-listen", &metrics_listen, "--reconcile-interval", "1", "--launching-stale-after", "2"])
                    .stdout(Stdio::inherit())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap();
                let base = format!("http://{listen}");

                // `dispatcher healthcheck` (the image's HEALTHCHECK and the chart's helm test)
                // says ready once the dispatcher is.
                let readyz = format!("{base}/readyz");
                poll_until("dispatcher healthcheck to pass", CLUSTER_TIMEOUT, || async {
                    let out = command(&["healthcheck", "--url", &readyz]).output().await.unwrap();
                    if out.status.success() { Ok(String::from_utf8_lossy(&out.stdout).into_owned()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
                })
                .await;

                let http = reqwest::Client::new();
                let body = json!({"name": "deploy-check", "image": "registry.invalid/x:1", "command": ["true"]});
                let response = http.post(format!("{base}/v1/tasks")).bearer_auth(&key).json(&body).send().await.unwrap();
                assert_eq!(response.status().as_u16(), 201);
                let task: Value = response.json().await.unwrap();
                let id = task["id"].as_str().unwrap().to_owned();
                let done = poll_until("the task to finish", CLUSTER_TIMEOUT, || async {
                    let task: Value = http.get(format!("{base}/v1/tasks/{id}")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
                    match task["state"].as_str() {
                        Some("succeeded" | "failed" | "cancelled" | "timed_out") => Ok(task),
                        _ => Err(task.to_string()),
                    }
                })
                .await;
                assert_eq!(done["state"], "succeeded", "{done}");

                // Its Job and pod exist in the restricted namespace; the pod got the
                // LimitRange's defaults (the task asked for nothing); nothing failed to create.
                let simple = id.replace('-', "");
                let jobs = Api::<Job>::namespaced(client.clone(), &names.tasks)
                    .list(&ListParams::default().labels(&format!("agent-bus.io/task-id={simple}")))
                    .await
                    .unwrap();
                assert_eq!(jobs.items.len(), 1);
                let task_pods = pods.list(&ListParams::default().labels(&format!("agent-bus.io/task-id={simple}"))).await.unwrap();
                assert_eq!(task_pods.items.len(), 1);
                let container = &task_pods.items[0].spec.as_ref().unwrap().containers[0];
                let requests = container.resources.as_ref().unwrap().requests.as_ref().unwrap();
                assert_eq!(requests["cpu"].0, "100m");
                // The runner comes from the dispatcher's image and reports to the api Service.
                let init = &task_pods.items[0].spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
                assert_eq!(init.name, "agent-bus-runner");
                assert_eq!(init.image.as_deref(), Some(runner_image.as_str()));
                assert_eq!(init.command.as_deref().unwrap(), ["/usr/local/bin/runner", "install", "/agent-bus/bin"]);
                let reports_to = container.env.as_ref().unwrap().iter().find(|e| e.name == "AGENT_BUS_REPORT_URL").unwrap().value.clone().unwrap();
                assert_eq!(reports_to, format!("{report_url}/internal/v1/tasks/{id}/attempts/1/reports"));
                let events = Api::<Event>::namespaced(client.clone(), &names.tasks).list(&ListParams::default()).await.unwrap();
                let failed: Vec<String> = events
                    .items
                    .iter()
                    .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
                    .map(|e| e.message.clone().unwrap_or_default())
                    .collect();
                assert!(failed.is_empty(), "{failed:?}");
                // The watcher took the Lease in the dispatcher's namespace.
                let lease = Api::<Lease>::namespaced(client.clone(), &names.dispatcher).get("agent-bus-watcher").await.unwrap();
                assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("deploy-test"));

                // And `dispatcher healthcheck` fails, with one line, when nothing answers.
                let dead = format!("http://127.0.0.1:{}/readyz", testsupport::free_port());
                let out = command(&["healthcheck", "--url", &dead]).output().await.unwrap();
                assert_eq!(out.status.code(), Some(1));
                let said = String::from_utf8_lossy(&out.stderr);
                assert_eq!(said.trim().lines().count(), 1, "{said}");
                assert!(said.starts_with(&format!("unhealthy: {dead}: ")), "{said}");
                std::fs::remove_dir_all(&dir).unwrap();
            })
            .await;
        })
        .await;
    })
    .await;
}
