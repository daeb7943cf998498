//! The deployment files, proven on the real test environment: the Helm chart
//! (`helm/agent-bus`), the Kustomize tree (`manifests/`), the Dockerfile and
//! docker-compose.yml.
//!
//! - the chart lints with each values file and its schema refuses unknown keys;
//! - the chart's and each overlay's rendered objects pass a server-side dry-run (the
//!   Prometheus Operator and External Secrets CRDs they use are installed from
//!   `tests/fixtures/crds.yaml` first), with no Pod Security warning;
//! - `helm install` with values-dev.yaml creates every object and its pods are admitted
//!   in a `restricted` namespace;
//! - the dispatcher's ServiceAccount may do what the dispatcher does and nothing more
//!   (`kubectl auth can-i`), and the real dispatcher binary, running with that
//!   ServiceAccount's token, launches a task whose Job is admitted in the `restricted`
//!   tasks namespace, under its ResourceQuota and LimitRange;
//! - the chart and the overlays agree on RBAC rules, probes, security contexts and
//!   resources, and the alert rules agree in their three copies and pass their promtool
//!   tests; the Alertmanager example routes as documented and the Grafana dashboard names
//!   only metrics the dispatcher exposes;
//! - the Dockerfile passes BuildKit's checks and docker-compose.yml the Compose loader
//!   (both through `deploylint`, built by `tests/env/build`).
//!
//! Every test uses its own namespaces (unique suffix), so parallel runs never collide, and
//! deletes them afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dispatcher::placement::PlacementCatalog;
use futures::FutureExt as _;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use testsupport::{
    CLUSTER_TIMEOUT, TestNamespace, kube_client, poll_until, unique_suffix, with_database,
    with_namespace, with_redis_keyspace,
};

// --- running tools ------------------------------------------------------------------------

use testsupport::{program_on_path as tool, repo_root};

/// `deploylint`: on the PATH when `tests/env/up` put it there, else built (or found in
/// the cache) by `tests/env/build deploylint`.
fn deploylint() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(found) = std::env::split_paths(&path)
        .map(|dir| dir.join("deploylint"))
        .find(|candidate| candidate.is_file())
    {
        return found;
    }
    let built = run(repo_root().join("tests/env/build"), &["deploylint"], None);
    PathBuf::from(built.stdout.trim()).join("deploylint")
}

struct Output {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs a program to the end; `stdin` is written to it when given.
fn run_status(program: impl AsRef<Path>, args: &[&str], stdin: Option<&str>) -> Output {
    let program = program.as_ref();
    let mut child = Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_owned();
        // A separate thread, so a large input cannot deadlock against a full stdout pipe.
        std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    }
    let output = child.wait_with_output().unwrap();
    Output {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a program that must succeed.
fn run(program: impl AsRef<Path>, args: &[&str], stdin: Option<&str>) -> Output {
    let shown = format!("{} {}", program.as_ref().display(), args.join(" "));
    let output = run_status(program, args, stdin);
    assert!(
        output.success,
        "`{shown}` failed\n--- stdout\n{}\n--- stderr\n{}",
        output.stdout, output.stderr
    );
    output
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    run(tool("kubectl"), args, stdin)
}

fn helm(args: &[&str]) -> Output {
    run(tool("helm"), args, None)
}

// --- YAML documents -------------------------------------------------------------------------

/// The documents of a multi-document YAML stream (split on `---` lines), without empty ones.
fn yaml_docs(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().unwrap();
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.into_iter()
        .filter(|doc| doc.lines().any(|l| l.starts_with("kind:")))
        .collect()
}

fn kind_of(doc: &str) -> &str {
    doc.lines()
        .find_map(|l| l.strip_prefix("kind: "))
        .unwrap_or_default()
        .trim()
}

/// Rendered YAML as JSON objects, through `kubectl create --dry-run=client` (no YAML
/// parser needed, and the same decoding kubectl applies).
fn objects(yaml: &str) -> Vec<Value> {
    let out = kubectl(
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        Some(yaml),
    );
    serde_json::Deserializer::from_str(&out.stdout)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let present: Vec<String> = objects
                .iter()
                .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
                .collect();
            panic!("no {kind} {name} among {present:?}")
        })
}

/// The dispatcher's ConfigMap: `agent-bus-config` from the chart, `agent-bus-config-<hash>`
/// from Kustomize's generator.
fn config_map(objects: &[Value]) -> &Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n == "agent-bus-config" || n.starts_with("agent-bus-config-"))
        })
        .collect();
    assert_eq!(found.len(), 1, "one dispatcher ConfigMap: {found:?}");
    found[0]
}

/// The dispatcher Deployments (the three roles), by name.
fn dispatcher_deployments(objects: &[Value]) -> Vec<&Value> {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" && dispatcher_container(o).is_some())
        .collect();
    assert_eq!(found.len(), 3, "three dispatcher Deployments");
    found
}

fn dispatcher_container(deployment: &Value) -> Option<&Value> {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "dispatcher")
}

/// The entry `name` of a container's `env`.
fn env_entry<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {}", container["env"]))
}

/// The literal value of a container's environment variable `name`.
fn env_value<'a>(container: &'a Value, name: &str) -> &'a str {
    env_entry(container, name)["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no literal value"))
}

// --- namespaces, CRDs, rendering --------------------------------------------------------------

/// The two namespaces of one installation, unique per test run.
#[derive(Debug, Clone)]
struct Names {
    dispatcher: String,
    tasks: String,
}

impl Names {
    fn unique(prefix: &str) -> Self {
        let dispatcher = format!("{prefix}-{}", unique_suffix());
        let tasks = format!("{dispatcher}-tasks");
        Self { dispatcher, tasks }
    }

    /// The names every file ships with.
    fn defaults() -> Self {
        Self {
            dispatcher: "agent-bus".to_owned(),
            tasks: "agent-bus-tasks".to_owned(),
        }
    }

    fn service_account(&self) -> String {
        format!("system:serviceaccount:{}:agent-bus", self.dispatcher)
    }
}

/// `kubectl kustomize` of an overlay, with the namespace names of `base/namespaces.yaml`
/// replaced by `names` in a copy of the tree: the one place an installation names them.
fn kustomize(overlay: &str, names: &Names) -> String {
    kustomize_edited(&format!("overlays/{overlay}"), names, |_| {})
}

/// `kubectl kustomize` of `dir` (relative to `manifests/`) in a copy of the tree renamed to
/// `names`, after `edit` changed the copy (it gets the copy's `manifests/` folder).
fn kustomize_edited(dir: &str, names: &Names, edit: impl FnOnce(&Path)) -> String {
    let copy = std::env::temp_dir().join(format!("agent-bus-manifests-{}", unique_suffix()));
    copy_tree(&repo_root().join("manifests"), &copy);
    let file = copy.join("base/namespaces.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let renamed = text
        .replace(
            "\n  dispatcher: agent-bus\n",
            &format!("\n  dispatcher: {}\n", names.dispatcher),
        )
        .replace(
            "\n  tasks: agent-bus-tasks\n",
            &format!("\n  tasks: {}\n", names.tasks),
        );
    assert!(
        names.dispatcher == "agent-bus" || text != renamed,
        "base/namespaces.yaml no longer names the namespaces as expected"
    );
    std::fs::write(&file, renamed).unwrap();
    edit(&copy);
    let out = run_status(
        tool("kubectl"),
        &["kustomize", copy.join(dir).to_str().unwrap()],
        None,
    );
    std::fs::remove_dir_all(&copy).unwrap();
    assert!(out.success, "kubectl kustomize {dir}: {}", out.stderr);
    out.stdout
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `helm template` of the chart into `names`, with a values file (or the defaults).
fn helm_template(names: &Names, values: Option<&str>) -> String {
    helm_template_set(names, values, &[])
}

/// `helm template` as above, with more `--set` values.
fn helm_template_set(names: &Names, values: Option<&str>, sets: &[&str]) -> String {
    let chart = repo_root().join("helm/agent-bus");
    let tasks = format!("tasks.namespace={}", names.tasks);
    let mut args = vec![
        "template",
        "agent-bus",
        chart.to_str().unwrap(),
        "--namespace",
        &names.dispatcher,
        "--kube-version",
        "v1.34.4",
        "--set",
        &tasks,
    ];
    let values_path;
    if let Some(values) = values {
        values_path = chart.join(values);
        args.extend(["-f", values_path.to_str().unwrap()]);
    }
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&args).stdout
}

/// Creates the namespaces for real (as `restricted` as the installation asks, labelled as
/// test namespaces): the rendered Namespace objects, and for the chart, whose release
/// namespace is not one of its objects, a `restricted` release namespace.
fn create_namespaces(rendered: &str, names: &Names) {
    let mut namespaces: Vec<String> = yaml_docs(rendered)
        .into_iter()
        .filter(|doc| kind_of(doc) == "Namespace")
        .collect();
    for name in [&names.dispatcher, &names.tasks] {
        if !namespaces
            .iter()
            .any(|doc| doc.contains(&format!("name: {name}\n")))
        {
            namespaces.push(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    \
                 pod-security.kubernetes.io/enforce: restricted\n    \
                 pod-security.kubernetes.io/warn: restricted\n"
            ));
        }
    }
    kubectl(&["apply", "-f", "-"], Some(&namespaces.join("---\n")));
    for name in [&names.dispatcher, &names.tasks] {
        kubectl(
            &["label", "namespace", name, "agent-bus.io/test=true"],
            None,
        );
    }
}

fn delete_namespaces(names: &Names) {
    for name in [&names.dispatcher, &names.tasks] {
        let out = run_status(
            tool("kubectl"),
            &[
                "delete",
                "namespace",
                name,
                "--wait=false",
                "--ignore-not-found",
            ],
            None,
        );
        if !out.success {
            eprintln!("warning: deleting namespace {name}: {}", out.stderr);
        }
    }
}

/// Runs `body`; whatever happens, deletes the two namespaces (and runs `cleanup` first).
/// When `body` panics, the pods and events of both namespaces are printed.
async fn with_installation<F, Fut>(names: &Names, cleanup: impl FnOnce(), body: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let outcome = AssertUnwindSafe(body()).catch_unwind().await;
    if outcome.is_err() {
        let client = kube_client().await.unwrap();
        for name in [&names.dispatcher, &names.tasks] {
            let ns = TestNamespace {
                client: client.clone(),
                name: name.clone(),
            };
            eprintln!("{}", ns.report().await);
        }
    }
    cleanup();
    delete_namespaces(names);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Installs the partial Prometheus Operator and External Secrets CRDs
/// (`tests/fixtures/crds.yaml`) and waits until the API server serves them.
fn ensure_crds() {
    let crds = repo_root().join("dispatcher/tests/fixtures/crds.yaml");
    kubectl(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "agent-bus-tests",
            "-f",
            crds.to_str().unwrap(),
        ],
        None,
    );
    kubectl(
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout",
            "90s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
            "crd/externalsecrets.external-secrets.io",
        ],
        None,
    );
}

/// A server-side dry-run of everything rendered (the namespaces exist for real first):
/// every object is admitted, and no Pod Security warning is printed.
fn server_side_dry_run(rendered: &str, names: &Names) -> Vec<Value> {
    create_namespaces(rendered, names);
    let out = kubectl(
        &["apply", "--dry-run=server", "-o", "json", "-f", "-"],
        Some(rendered),
    );
    assert!(
        !out.stderr.contains("Warning"),
        "the dry-run warned:\n{}",
        out.stderr
    );
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    let items = list["items"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![list]);
    assert_eq!(
        items.len(),
        yaml_docs(rendered).len(),
        "every rendered object is in the dry-run's answer"
    );
    items
}

// --- the chart --------------------------------------------------------------------------------

#[test]
fn the_chart_lints_with_each_values_file_and_refuses_unknown_keys() {
    let chart = repo_root().join("helm/agent-bus");
    let chart = chart.to_str().unwrap();
    for values in [None, Some("values-dev.yaml"), Some("values-prod.yaml")] {
        let mut args = vec!["lint", "--strict", chart];
        let path;
        if let Some(values) = values {
            path = format!("{chart}/{values}");
            args.extend(["-f", &path]);
        }
        let out = helm(&args);
        assert!(
            out.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{}",
            out.stdout
        );
    }
    // values.schema.json: a misspelt key is an error, at the top and deep down.
    for bad in [
        "replicaz=3",
        "api.replicaz=3",
        "tasks.limitRange.maxx.cpu=1",
        "probes.liveness.periodSecond=1",
    ] {
        let out = run_status(tool("helm"), &["lint", chart, "--set", bad], None);
        assert!(!out.success, "helm lint accepted --set {bad}");
        let said = format!("{}{}", out.stdout, out.stderr);
        assert!(
            said.contains("additional properties"),
            "--set {bad}: {said}"
        );
    }
    // Contradicting secret sources are refused with a message that says what to do.
    let out = run_status(
        tool("helm"),
        &[
            "template",
            "x",
            chart,
            "--kube-version",
            "v1.34.4",
            "--set",
            "externalSecret.enabled=true",
        ],
        None,
    );
    assert!(!out.success);
    assert!(
        out.stderr.contains("choose exactly one of secrets.create"),
        "{}",
        out.stderr
    );
}

/// The dotted paths of the keys that values.yaml documents (a `# --` comment above them).
fn documented_values(text: &str) -> Vec<String> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut documented = false;
    let mut block: Option<usize> = None;
    let mut paths = Vec::new();
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some(block_indent) = block {
            if trimmed.is_empty() || indent > block_indent {
                continue;
            }
            block = None;
        }
        if trimmed.starts_with("# --") {
            documented = true;
            continue;
        }
        if trimmed.starts_with('#') || trimmed.starts_with('-') || trimmed.is_empty() {
            continue;
        }
        let Some((key, rest)) = trimmed.split_once(':') else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_owned()));
        if rest.trim().starts_with('|') || rest.trim().starts_with('>') {
            block = Some(indent);
        }
        if documented {
            paths.push(
                stack
                    .iter()
                    .map(|(_, k)| k.as_str())
                    .collect::<Vec<_>>()
                    .join("."),
            );
            documented = false;
        }
    }
    paths
}

#[test]
fn every_value_is_documented_in_the_chart_readme() {
    let chart = repo_root().join("helm/agent-bus");
    let values = std::fs::read_to_string(chart.join("values.yaml")).unwrap();
    let readme = std::fs::read_to_string(chart.join("README.md")).unwrap();
    let documented = documented_values(&values);
    assert!(documented.len() > 100, "{documented:?}");
    let missing: Vec<&String> = documented
        .iter()
        .filter(|path| !readme.contains(&format!("| `{path}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "values missing from the README's table: {missing:?}"
    );
}

#[test]
fn the_chart_passes_a_server_side_dry_run_with_each_values_file() {
    ensure_crds();
    for values in [None, Some("values-dev.yaml"), Some("values-prod.yaml")] {
        let names = Names::unique("deploy-chart-dry");
        let rendered = helm_template(&names, values);
        let outcome = std::panic::catch_unwind(|| server_side_dry_run(&rendered, &names));
        delete_namespaces(&names);
        let items = outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let kinds: Vec<&str> = items.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        for kind in [
            "Deployment",
            "Role",
            "RoleBinding",
            "ServiceAccount",
            "Service",
            "ConfigMap",
            "NetworkPolicy",
            "ResourceQuota",
            "LimitRange",
            "Pod",
        ] {
            assert!(kinds.contains(&kind), "{values:?}: no {kind} in {kinds:?}");
        }
        if values == Some("values-prod.yaml") {
            for kind in [
                "ExternalSecret",
                "ServiceMonitor",
                "PrometheusRule",
                "Ingress",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "PersistentVolumeClaim",
            ] {
                assert!(kinds.contains(&kind), "prod: no {kind} in {kinds:?}");
            }
            assert!(
                !kinds.contains(&"Secret"),
                "prod takes its Secret from the ExternalSecret"
            );
        }
    }
}

#[tokio::test]
async fn helm_install_with_the_dev_values_creates_every_object() {
    let names = Names::unique("deploy-helm");
    let uninstall = {
        let names = names.clone();
        move || {
            let _ = run_status(
                tool("helm"),
                &[
                    "uninstall",
                    "agent-bus",
                    "--namespace",
                    &names.dispatcher,
                    "--wait",
                    "--timeout",
                    "60s",
                ],
                None,
            );
        }
    };
    with_installation(&names, uninstall, || async {
        // The release namespace is restricted too: the dispatcher's pods must be admitted.
        create_namespaces(
            "",
            &Names {
                dispatcher: names.dispatcher.clone(),
                tasks: names.dispatcher.clone(),
            },
        );
        let chart = repo_root().join("helm/agent-bus");
        let values = chart.join("values-dev.yaml");
        let tasks = format!("tasks.namespace={}", names.tasks);
        let started = std::time::Instant::now();
        let install = helm(&[
            "install",
            "agent-bus",
            chart.to_str().unwrap(),
            "-f",
            values.to_str().unwrap(),
            "--namespace",
            &names.dispatcher,
            "--set",
            &tasks,
        ]);
        eprintln!("helm install took {:?}", started.elapsed());
        assert!(
            install.stdout.contains("STATUS: deployed"),
            "{}",
            install.stdout
        );
        assert!(
            install
                .stdout
                .contains(&format!("Task Jobs run in namespace {}", names.tasks)),
            "NOTES: {}",
            install.stdout
        );

        // Every object of the release exists.
        let manifest = helm(&[
            "get",
            "manifest",
            "agent-bus",
            "--namespace",
            &names.dispatcher,
        ])
        .stdout;
        let expected = yaml_docs(&manifest).len();
        let found = kubectl(&["get", "-f", "-", "-o", "name"], Some(&manifest)).stdout;
        let found: Vec<&str> = found.lines().collect();
        assert_eq!(found.len(), expected, "{found:#?}");
        for object in [
            "namespace/",
            "serviceaccount/agent-bus",
            "role.rbac.authorization.k8s.io/agent-bus-dispatcher",
            "role.rbac.authorization.k8s.io/agent-bus-leader-election",
            "rolebinding.rbac.authorization.k8s.io/agent-bus-dispatcher",
            "configmap/agent-bus-config",
            "secret/agent-bus",
            "service/agent-bus-api",
            "deployment.apps/agent-bus-api",
            "deployment.apps/agent-bus-launcher",
            "deployment.apps/agent-bus-watcher",
            "statefulset.apps/agent-bus-postgres",
            "deployment.apps/agent-bus-redis",
            "networkpolicy.networking.k8s.io/agent-bus-dispatcher",
            "networkpolicy.networking.k8s.io/agent-bus-default-deny",
            "resourcequota/agent-bus-tasks",
            "limitrange/agent-bus-tasks",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(object)),
                "{object} missing from {found:#?}"
            );
        }
        // Their pods are admitted in the restricted namespace and (kwok plays the kubelet)
        // become ready.
        for workload in [
            "deployment/agent-bus-api",
            "deployment/agent-bus-launcher",
            "deployment/agent-bus-watcher",
            "deployment/agent-bus-redis",
            "statefulset/agent-bus-postgres",
        ] {
            poll_until(&format!("{workload} ready"), CLUSTER_TIMEOUT, || async {
                let out = run_status(
                    tool("kubectl"),
                    &[
                        "get",
                        workload,
                        "-n",
                        &names.dispatcher,
                        "-o",
                        "jsonpath={.status.readyReplicas}/{.spec.replicas}",
                    ],
                    None,
                );
                if out.success && out.stdout == "1/1" {
                    Ok(())
                } else {
                    Err(format!("{} {}", out.stdout, out.stderr))
                }
            })
            .await;
        }
        assert_rbac(&names);
    })
    .await;
}

// --- RBAC and admission, on the dev overlay ------------------------------------------------------

/// What the dispatcher's ServiceAccount may and may not do (`kubectl auth can-i`).
fn assert_rbac(names: &Names) {
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
        (&["get", "leases.coordination.k8s.io", "-n", d], "yes"),
        (&["create", "leases.coordination.k8s.io", "-n", d], "yes"),
        (&["update", "leases.coordination.k8s.io", "-n", d], "yes"),
        // Nothing else.
        (&["get", "secrets", "-n", t], "no"),
        (&["get", "secrets", "-n", d], "no"),
        (&["list", "secrets", "-n", d], "no"),
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
    ensure_crds();
    for overlay in ["dev", "prod"] {
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
fn apply_dev_overlay(names: &Names) -> String {
    let rendered = kustomize("dev", names);
    create_namespaces(&rendered, names);
    let out = kubectl(&["apply", "-f", "-"], Some(&rendered));
    assert!(!out.stderr.contains("Warning"), "{}", out.stderr);
    rendered
}

#[tokio::test]
async fn the_dispatchers_service_account_may_do_what_it_needs_and_nothing_more() {
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
fn service_account_kubeconfig(names: &Names, dir: &Path) -> PathBuf {
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
                    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"));
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
                        .kill_on_drop(true);
                    command
                };
                let key = command(&["tenant", "create", "acme"]).stderr(Stdio::inherit()).output().await.unwrap();
                assert!(key.status.success());
                let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();
                let listen = format!("127.0.0.1:{}", testsupport::free_port());
                let _dispatcher = command(&["serve", "--executor", "kubernetes", "--listen", &listen, "--reconcile-interval", "1", "--launching-stale-after", "2"])
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

// --- the chart and the overlays agree ------------------------------------------------------------

/// What must be the same in the chart and the Kustomize tree, for one installation.
fn contract(objects: &[Value]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for role in ["agent-bus-dispatcher", "agent-bus-leader-election"] {
        out.insert(
            format!("Role {role} rules"),
            find(objects, "Role", role)["rules"].clone(),
        );
    }
    for name in ["agent-bus-api", "agent-bus-launcher", "agent-bus-watcher"] {
        let deployment = find(objects, "Deployment", name);
        let pod = &deployment["spec"]["template"]["spec"];
        let container = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "dispatcher")
            .unwrap();
        for field in [
            "startupProbe",
            "livenessProbe",
            "readinessProbe",
            "securityContext",
            "resources",
            "ports",
            "volumeMounts",
            "args",
        ] {
            out.insert(
                format!("{name} container {field}"),
                container[field].clone(),
            );
        }
        out.insert(
            format!("{name} pod securityContext"),
            pod["securityContext"].clone(),
        );
        out.insert(
            format!("{name} serviceAccountName"),
            pod["serviceAccountName"].clone(),
        );
        let env: BTreeMap<String, Value> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                let name = e["name"].as_str().unwrap();
                // Values that only the chart sets (from its config block) are not compared.
                [
                    "AGENT_BUS_ROLES",
                    "AGENT_BUS_LISTEN",
                    "AGENT_BUS_EXECUTOR",
                    "AGENT_BUS_NAMESPACE",
                    "AGENT_BUS_LEASE_NAMESPACE",
                    "AGENT_BUS_LEASE_NAME",
                    "AGENT_BUS_LOG_FORMAT",
                    "AGENT_BUS_PLACEMENT_FILE",
                    "AGENT_BUS_REPORT_URL",
                    "AGENT_BUS_RUNNER_IMAGE",
                    "AGENT_BUS_REPORT_SECRET",
                    "AGENT_BUS_INSTANCE",
                    "DATABASE_URL",
                    "REDIS_URL",
                ]
                .contains(&name)
            })
            .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
            .collect();
        out.insert(format!("{name} env"), json!(env));
        let replicas = objects
            .iter()
            .find(|o| o["kind"] == "HorizontalPodAutoscaler" && o["metadata"]["name"] == name)
            .map_or_else(
                || deployment["spec"]["replicas"].clone(),
                |hpa| json!([hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]]),
            );
        out.insert(format!("{name} replicas (or HPA range)"), replicas);
    }
    out.insert(
        "ConfigMap data".to_owned(),
        config_map(objects)["data"].clone(),
    );
    let tasks: Vec<&Value> = objects
        .iter()
        .filter(|o| ["ResourceQuota", "LimitRange"].contains(&o["kind"].as_str().unwrap()))
        .collect();
    for object in tasks {
        out.insert(format!("{} spec", object["kind"]), object["spec"].clone());
    }
    out
}

#[test]
fn the_chart_and_the_overlays_agree_on_rbac_probes_security_and_resources() {
    ensure_crds();
    let names = Names {
        dispatcher: "agent-bus".to_owned(),
        tasks: "agent-bus-tasks".to_owned(),
    };
    for (overlay, values) in [("dev", "values-dev.yaml"), ("prod", "values-prod.yaml")] {
        let kustomized = contract(&objects(&kustomize(overlay, &names)));
        let charted = contract(&objects(&helm_template(&names, Some(values))));
        let mut differences = Vec::new();
        for (key, value) in &kustomized {
            let other = charted.get(key).unwrap_or(&Value::Null);
            if other != value {
                differences.push(format!(
                    "{key}:\n  manifests/overlays/{overlay}: {value}\n  helm {values}: {other}"
                ));
            }
        }
        assert!(differences.is_empty(), "{}", differences.join("\n"));
        assert!(kustomized.len() > 30, "{kustomized:#?}");
    }
}

// --- the placement file, the report URL and the runner image --------------------------------

#[test]
fn the_shipped_placement_file_is_the_dispatchers_own_and_the_dispatcher_accepts_it() {
    let expected =
        std::fs::read_to_string(repo_root().join("dispatcher/config/placement.yaml")).unwrap();
    // The file is the dispatcher's built-in default, so shipping it changes nothing.
    let parsed = PlacementCatalog::parse(&expected, "dispatcher/config/placement.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed, PlacementCatalog::default());
    ensure_crds();
    let names = Names::defaults();
    let shipped = [
        (
            "helm/agent-bus (default values)",
            helm_template(&names, None),
        ),
        (
            "helm/agent-bus -f values-dev.yaml",
            helm_template(&names, Some("values-dev.yaml")),
        ),
        (
            "helm/agent-bus -f values-prod.yaml",
            helm_template(&names, Some("values-prod.yaml")),
        ),
        ("manifests/base", kustomize_edited("base", &names, |_| {})),
        ("manifests/overlays/dev", kustomize("dev", &names)),
        ("manifests/overlays/prod", kustomize("prod", &names)),
    ];
    for (source, rendered) in &shipped {
        for gone in [
            "gpu-classes.yaml",
            "prices.yaml",
            "_GPU_CLASSES_FILE",
            "_PRICES_FILE",
        ] {
            assert!(!rendered.contains(gone), "{source} still names {gone}");
        }
        let objects = objects(rendered);
        let config = config_map(&objects);
        let data = config["data"].as_object().unwrap();
        let keys: Vec<&String> = data.keys().collect();
        assert_eq!(keys, ["placement.yaml"], "{source}");
        let text = data["placement.yaml"].as_str().unwrap();
        assert!(
            text == expected,
            "{source}: placement.yaml is not dispatcher/config/placement.yaml:\n{text}"
        );
        let catalog = PlacementCatalog::parse(text, "placement.yaml")
            .unwrap_or_else(|e| panic!("{source}: the dispatcher refuses its placement.yaml: {e}"));
        assert_eq!(catalog, PlacementCatalog::default(), "{source}");
        // Every role reads it where its pod mounts that ConfigMap.
        for deployment in dispatcher_deployments(&objects) {
            let name = &deployment["metadata"]["name"];
            let volume = deployment["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["configMap"]["name"] == config["metadata"]["name"])
                .unwrap_or_else(|| panic!("{source} {name}: the ConfigMap is not a volume"));
            let container = dispatcher_container(deployment).unwrap();
            let mount = container["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == volume["name"])
                .unwrap_or_else(|| panic!("{source} {name}: the ConfigMap is not mounted"));
            assert_eq!(
                env_value(container, "AGENT_BUS_PLACEMENT_FILE"),
                format!("{}/placement.yaml", mount["mountPath"].as_str().unwrap()),
                "{source} {name}"
            );
        }
    }
}

/// `matchLabels` of `selector` (absent: everything) are all among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "matchExpressions are not evaluated here: {selector}"
    );
    selector["matchLabels"]
        .as_object()
        .is_none_or(|wanted| wanted.iter().all(|(k, v)| labels[k] == *v))
}

/// A pod in a namespace, as a NetworkPolicy sees it.
struct PodAt<'a> {
    namespace: &'a str,
    labels: &'a Value,
}

/// Whether a NetworkPolicy peer (`from`/`to` entry) includes `pod`.
fn peer_includes(peer: &Value, policy_namespace: &str, pod: &PodAt) -> bool {
    if !peer["ipBlock"].is_null() {
        return false;
    }
    let namespace_ok = if peer["namespaceSelector"].is_null() {
        pod.namespace == policy_namespace
    } else {
        selects(
            &peer["namespaceSelector"],
            &json!({"kubernetes.io/metadata.name": pod.namespace}),
        )
    };
    namespace_ok && (peer["podSelector"].is_null() || selects(&peer["podSelector"], pod.labels))
}

/// Whether a NetworkPolicy rule's ports include TCP `port` (no ports: all of them).
fn rule_allows_port(rule: &Value, port: i64) -> bool {
    rule["ports"].as_array().is_none_or(|ports| {
        ports.iter().any(|p| {
            p["port"].as_i64() == Some(port) && p["protocol"].as_str().unwrap_or("TCP") == "TCP"
        })
    })
}

/// The NetworkPolicies of `objects` that govern `direction` (`Ingress`/`Egress`) of `pod`.
fn policies_for<'a>(objects: &'a [Value], pod: &PodAt, direction: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| {
            o["kind"] == "NetworkPolicy"
                && o["metadata"]["namespace"] == pod.namespace
                && selects(&o["spec"]["podSelector"], pod.labels)
                && o["spec"]["policyTypes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t == direction)
        })
        .collect()
}

/// For one rendered installation: every role's AGENT_BUS_REPORT_URL is the api Service
/// in the dispatcher namespace; that Service leads to the api pods' port; the tasks
/// namespace's policies let task pods out to exactly that pod port, and the dispatcher's
/// let them in; the runner image is the dispatcher's own and the report secret an
/// optional key of the dispatcher's Secret.
fn assert_reports_reach_the_api(source: &str, objects: &[Value]) {
    let deployments = dispatcher_deployments(objects);
    let first = dispatcher_container(deployments[0]).unwrap();
    let url = env_value(first, "AGENT_BUS_REPORT_URL");
    let tasks_namespace = env_value(first, "AGENT_BUS_NAMESPACE");
    let (host, port) = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once(':'))
        .unwrap_or_else(|| panic!("{source}: report URL {url} is not http://host:port"));
    let port: i64 = port.parse().unwrap();
    let host: Vec<&str> = host.split('.').collect();
    let [service_name, namespace, "svc"] = host[..] else {
        panic!("{source}: report URL {url} is not http://<service>.<namespace>.svc:<port>");
    };
    for deployment in &deployments {
        let container = dispatcher_container(deployment).unwrap();
        let name = &deployment["metadata"]["name"];
        assert_eq!(
            deployment["metadata"]["namespace"], namespace,
            "{source} {name}"
        );
        assert_eq!(
            env_value(container, "AGENT_BUS_REPORT_URL"),
            url,
            "{source} {name}"
        );
        assert_eq!(
            env_value(container, "AGENT_BUS_NAMESPACE"),
            tasks_namespace,
            "{source} {name}"
        );
        // The init container of every task pod is the dispatcher's own image.
        assert_eq!(
            env_value(container, "AGENT_BUS_RUNNER_IMAGE"),
            container["image"].as_str().unwrap(),
            "{source} {name}"
        );
        // The report secret is an optional key of the Secret the database URL is in.
        let database = &env_entry(container, "DATABASE_URL")["valueFrom"]["secretKeyRef"];
        assert_eq!(
            env_entry(container, "AGENT_BUS_REPORT_SECRET")["valueFrom"]["secretKeyRef"],
            json!({"name": database["name"], "key": "report-secret", "optional": true}),
            "{source} {name}"
        );
    }
    let service = find(objects, "Service", service_name);
    assert_eq!(service["metadata"]["namespace"], namespace, "{source}");
    let service_port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"].as_i64() == Some(port))
        .unwrap_or_else(|| panic!("{source}: Service {service_name} has no port {port}"));
    let api: Vec<&&Value> = deployments
        .iter()
        .filter(|d| {
            selects(
                &json!({"matchLabels": service["spec"]["selector"]}),
                &d["spec"]["template"]["metadata"]["labels"],
            )
        })
        .collect();
    assert_eq!(api.len(), 1, "{source}: the Service selects one role");
    assert_eq!(
        api[0]["metadata"]["labels"]["app.kubernetes.io/component"],
        "api"
    );
    let api_labels = &api[0]["spec"]["template"]["metadata"]["labels"];
    let pod_port =
        dispatcher_container(api[0]).unwrap()["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["name"] == service_port["targetPort"]
                    || p["containerPort"] == service_port["targetPort"]
            })
            .unwrap_or_else(|| {
                panic!("{source}: no container port {}", service_port["targetPort"])
            })["containerPort"]
            .as_i64()
            .unwrap();
    assert_eq!(pod_port, 8080, "{source}");

    let api_pod = PodAt {
        namespace,
        labels: api_labels,
    };
    let task_labels = json!({"app.kubernetes.io/managed-by": "agent-bus"});
    let task_pod = PodAt {
        namespace: tasks_namespace,
        labels: &task_labels,
    };
    // Out of a task pod: policies apply (so everything else is denied), and one lets it
    // reach the api pods on their port.
    let egress = policies_for(objects, &task_pod, "Egress");
    assert!(
        !egress.is_empty(),
        "{source}: task pods' egress is not restricted"
    );
    assert!(
        egress.iter().any(|policy| {
            policy["spec"]["egress"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| {
                    rule_allows_port(rule, pod_port)
                        && rule["to"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|peer| peer_includes(peer, tasks_namespace, &api_pod))
                })
        }),
        "{source}: no egress from {tasks_namespace} to the api pods on {pod_port}"
    );
    // Into an api pod: policies apply, and one lets task pods in on that port.
    let ingress = policies_for(objects, &api_pod, "Ingress");
    assert!(
        !ingress.is_empty(),
        "{source}: the api's ingress is not restricted"
    );
    assert!(
        ingress.iter().any(|policy| {
            policy["spec"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| {
                    rule_allows_port(rule, pod_port)
                        && rule["from"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|peer| peer_includes(peer, namespace, &task_pod))
                })
        }),
        "{source}: no ingress into the api pods from {tasks_namespace} on {pod_port}"
    );
}

#[test]
fn task_pods_reach_the_api_at_the_report_url_through_both_network_policies() {
    ensure_crds();
    let defaults = Names::defaults();
    let renamed = Names::unique("deploy-report");
    let installations = [
        ("helm (default values)", helm_template(&defaults, None)),
        (
            "helm -f values-prod.yaml, renamed",
            helm_template(&renamed, Some("values-prod.yaml")),
        ),
        // The URL names the Service's port; the policies the pods' port.
        (
            "helm, fullnameOverride=ab, service.port=80",
            helm_template_set(&renamed, None, &["fullnameOverride=ab", "service.port=80"]),
        ),
        ("manifests/overlays/dev", kustomize("dev", &defaults)),
        (
            "manifests/overlays/dev, renamed",
            kustomize("dev", &renamed),
        ),
        (
            "manifests/overlays/prod, renamed",
            kustomize("prod", &renamed),
        ),
    ];
    for (source, rendered) in &installations {
        assert_reports_reach_the_api(source, &objects(rendered));
    }
    let port_80 = objects(&installations[2].1);
    assert_eq!(
        env_value(
            dispatcher_container(find(&port_80, "Deployment", "ab-launcher")).unwrap(),
            "AGENT_BUS_REPORT_URL"
        ),
        format!("http://ab-api.{}.svc:80", renamed.dispatcher)
    );
    // runner.reportUrl replaces the in-cluster URL (e.g. a route through a gateway).
    let overridden = objects(&helm_template_set(
        &defaults,
        None,
        &["runner.reportUrl=https://reports.example.com/agent-bus"],
    ));
    for deployment in dispatcher_deployments(&overridden) {
        assert_eq!(
            env_value(
                dispatcher_container(deployment).unwrap(),
                "AGENT_BUS_REPORT_URL"
            ),
            "https://reports.example.com/agent-bus"
        );
    }
}

#[test]
fn the_runner_image_follows_the_dispatchers_image_and_the_report_secret_is_optional() {
    ensure_crds();
    let names = Names::defaults();
    let images = |objects: &[Value]| -> Vec<(String, String)> {
        dispatcher_deployments(objects)
            .into_iter()
            .map(|d| {
                let container = dispatcher_container(d).unwrap();
                (
                    container["image"].as_str().unwrap().to_owned(),
                    env_value(container, "AGENT_BUS_RUNNER_IMAGE").to_owned(),
                )
            })
            .collect()
    };
    // Kustomize: what `kustomize edit set image ghcr.io/agent-bus/agent-bus=registry.example.com/agent-bus:9.9.9`
    // writes into an overlay changes both images.
    for overlay in ["dev", "prod"] {
        let rendered = kustomize_edited(&format!("overlays/{overlay}"), &names, |copy| {
            let file = copy.join(format!("overlays/{overlay}/kustomization.yaml"));
            let text = std::fs::read_to_string(&file).unwrap();
            let tag = if overlay == "dev" { "dev" } else { "0.1.0" };
            let edited = text.replacen(
                &format!("    newTag: {tag}\n"),
                "    newName: registry.example.com/agent-bus\n    newTag: 9.9.9\n",
                1,
            );
            assert_ne!(edited, text, "{overlay}: no `newTag: {tag}` line");
            std::fs::write(&file, edited).unwrap();
        });
        for pair in images(&objects(&rendered)) {
            let expected = "registry.example.com/agent-bus:9.9.9".to_owned();
            assert_eq!(pair, (expected.clone(), expected), "{overlay}");
        }
    }
    // The chart: from image.repository, image.tag (default appVersion) or image.digest.
    let digest = format!("sha256:{}", "ab".repeat(32));
    let digest_set = format!("image.digest={digest}");
    for (sets, expected) in [
        (vec![], "ghcr.io/agent-bus/agent-bus:0.1.0".to_owned()),
        (
            vec![
                "image.repository=registry.example.com/agent-bus",
                "image.tag=9.9.9",
            ],
            "registry.example.com/agent-bus:9.9.9".to_owned(),
        ),
        (
            vec![digest_set.as_str()],
            format!("ghcr.io/agent-bus/agent-bus@{digest}"),
        ),
    ] {
        let objects = objects(&helm_template_set(&names, None, &sets));
        for pair in images(&objects) {
            assert_eq!(pair, (expected.clone(), expected.clone()), "{sets:?}");
        }
        for deployment in dispatcher_deployments(&objects) {
            let container = dispatcher_container(deployment).unwrap();
            assert_eq!(
                env_value(container, "AGENT_BUS_RUNNER_IMAGE_PULL_POLICY"),
                container["imagePullPolicy"].as_str().unwrap()
            );
        }
    }

    // The report secret: absent by default (the dispatcher makes one), in the chart's
    // Secret or the ExternalSecret when configured, refused when too short.
    let secret = |objects: &[Value]| find(objects, "Secret", "agent-bus").clone();
    let plain = secret(&objects(&helm_template(&names, None)));
    assert!(
        plain["stringData"].get("report-secret").is_none(),
        "{plain}"
    );
    let key = "0123456789abcdef0123456789abcdef";
    let set = format!("secrets.reportSecret={key}");
    let with_key = secret(&objects(&helm_template_set(&names, None, &[&set])));
    assert_eq!(with_key["stringData"]["report-secret"], key);
    let external = objects(&helm_template_set(
        &names,
        Some("values-prod.yaml"),
        &["externalSecret.reportSecretKey=agent-bus/report-secret"],
    ));
    let data = find(&external, "ExternalSecret", "agent-bus")["spec"]["data"].clone();
    assert!(
        data.as_array().unwrap().contains(
            &json!({"secretKey": "report-secret", "remoteRef": {"key": "agent-bus/report-secret"}})
        ),
        "{data}"
    );
    let prod = objects(&helm_template(&names, Some("values-prod.yaml")));
    assert_eq!(
        find(&prod, "ExternalSecret", "agent-bus")["spec"]["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let chart = repo_root().join("helm/agent-bus");
    let out = run_status(
        tool("helm"),
        &[
            "lint",
            chart.to_str().unwrap(),
            "--set",
            "secrets.reportSecret=short",
        ],
        None,
    );
    assert!(
        !out.success,
        "a report secret under 32 characters was accepted"
    );
    assert!(
        out.stdout.contains("/secrets/reportSecret"),
        "{}",
        out.stdout
    );
}

// --- alerting and dashboards -------------------------------------------------------------------

const RULES: &str = "deploy/prometheus/agent-bus.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/tests";
const RUNBOOKS: &str = "https://github.com/agent-bus/agent-bus/blob/main/docs/OBSERVABILITY.md#";

/// The alerts docs/OBSERVABILITY.md documents and the end-to-end test drives.
const ALERTS: [&str; 13] = [
    "AgentBusDispatcherDown",
    "AgentBusHighApiErrorRate",
    "AgentBusLaunchFailures",
    "AgentBusTasksQueuedTooLong",
    "AgentBusTasksUnschedulable",
    "AgentBusHeartbeatLost",
    "AgentBusQueueAgeGrowing",
    "AgentBusDispatchLatencyBudgetBurn",
    "AgentBusHighCostRate",
    "AgentBusTenantBudgetExceeded",
    "AgentBusIdleGpus",
    "AgentBusDependencyErrors",
    "AgentBusMetricsSnapshotStale",
];

/// The `spec.groups` of the one PrometheusRule in rendered YAML, parsed here (no cluster
/// needed: helm template and kubectl kustomize run offline).
fn prometheus_rule_groups(rendered: &str) -> Value {
    let docs: Vec<String> = yaml_docs(rendered)
        .into_iter()
        .filter(|doc| kind_of(doc) == "PrometheusRule")
        .collect();
    assert_eq!(docs.len(), 1, "one PrometheusRule: {docs:?}");
    let rule: Value = serde_yaml_ng::from_str(&docs[0]).unwrap();
    assert_eq!(rule["metadata"]["name"], "agent-bus");
    rule["spec"]["groups"].clone()
}

/// The sample names the dispatcher exposes: gauges as they are, counters with `_total`,
/// histograms as their `_bucket`, `_sum` and `_count` series. From the families the
/// metrics module describes (the encoder leaves a family without samples out of the
/// text) and from the encoded text.
fn exposed_sample_names() -> std::collections::BTreeSet<String> {
    use dispatcher::metrics::{Kind, Metrics, family_names};
    let metrics = Metrics::new("x");
    let mut names = std::collections::BTreeSet::new();
    for family in metrics.described() {
        if family.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{}{suffix}", family.name));
            }
        } else {
            names.insert(family.name.clone());
        }
    }
    let text = metrics.encode().unwrap();
    for name in family_names(&text) {
        assert!(
            text.contains(&format!("# TYPE {name} histogram\n")) || names.contains(&name),
            "{name} is exposed but not described"
        );
    }
    assert!(names.len() > 30, "{names:?}");
    names
}

/// The `agent_bus_…` metric and `agent_bus:…` recording-rule names a PromQL text mentions
/// that are neither exposed by the dispatcher nor recorded by the rules.
fn unknown_names(
    promql: &str,
    exposed: &std::collections::BTreeSet<String>,
    recorded: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut unknown = Vec::new();
    for (start, _) in promql.match_indices("agent_bus") {
        if promql[..start].chars().next_back().is_some_and(is_name) {
            continue;
        }
        let end = promql[start..]
            .find(|c: char| !is_name(c))
            .map_or(promql.len(), |n| start + n);
        let name = &promql[start..end];
        let known = if name.contains(':') {
            recorded.contains(name)
        } else {
            exposed.contains(name)
        };
        if !known {
            unknown.push(name.to_owned());
        }
    }
    unknown
}

/// Every PromQL text of a Grafana dashboard: the targets' `expr`, the variables' `query`
/// and `definition`.
fn dashboard_promql(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match value {
                    Value::String(text)
                        if matches!(key.as_str(), "expr" | "query" | "definition") =>
                    {
                        found.push(text.clone());
                    }
                    _ => dashboard_promql(value, found),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                dashboard_promql(item, found);
            }
        }
        _ => {}
    }
}

#[test]
fn the_alert_rules_agree_in_their_three_copies_and_pass_their_promtool_tests() {
    // The copies are what deploy/prometheus/sync makes of the source.
    let sync = run(
        repo_root().join("deploy/prometheus/sync"),
        &["--check"],
        None,
    );
    assert_eq!(sync.stdout, "", "{}", sync.stderr);
    let out = run(tool("promtool"), &["check", "rules", RULES], None);
    assert!(out.stdout.contains("SUCCESS"), "{}", out.stdout);
    let mut tests: Vec<String> = std::fs::read_dir(repo_root().join(RULE_TESTS))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".test.yml"))
        .map(|name| format!("{RULE_TESTS}/{name}"))
        .collect();
    tests.sort();
    assert!(!tests.is_empty());
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let out = run(tool("promtool"), &args, None);
    assert_eq!(
        out.stdout.matches("SUCCESS").count(),
        tests.len(),
        "{}",
        out.stdout
    );

    // The chart and the prod overlay ship the source's groups.
    let text = std::fs::read_to_string(repo_root().join(RULES)).unwrap();
    let source: Value = serde_yaml_ng::from_str(&text).unwrap();
    let groups = source["groups"].clone();
    let names = Names {
        dispatcher: "agent-bus".to_owned(),
        tasks: "agent-bus-tasks".to_owned(),
    };
    assert_eq!(
        prometheus_rule_groups(&kustomize("prod", &names)),
        groups,
        "manifests/overlays/prod"
    );
    assert_eq!(
        prometheus_rule_groups(&helm_template(&names, Some("values-prod.yaml"))),
        groups,
        "helm/agent-bus with values-prod.yaml"
    );

    // Each alert: the documented set, labels, runbook anchor, a promtool test, and its
    // `for:` on a line of its own (the end-to-end test shortens them with a regex).
    let exposed = exposed_sample_names();
    let mut recorded = std::collections::BTreeSet::new();
    let mut alerts = std::collections::BTreeSet::new();
    let test_text: String = tests
        .iter()
        .map(|t| std::fs::read_to_string(repo_root().join(t)).unwrap())
        .collect();
    let rules: Vec<&Value> = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .collect();
    for rule in &rules {
        if let Some(record) = rule["record"].as_str() {
            assert!(record.starts_with("agent_bus:"), "{record}");
            recorded.insert(record.to_owned());
        }
    }
    let mut alert_rules = 0;
    for rule in &rules {
        let expr = rule["expr"].as_str().unwrap();
        let unknown = unknown_names(expr, &exposed, &recorded);
        assert!(
            unknown.is_empty(),
            "{RULES} names unknown {unknown:?} in {expr}"
        );
        let Some(alert) = rule["alert"].as_str() else {
            continue;
        };
        alert_rules += 1;
        alerts.insert(alert.to_owned());
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{alert}: severity {severity:?}"
        );
        let category = rule["labels"]["category"].as_str().unwrap_or_default();
        assert!(
            ["availability", "tasks", "cost", "capacity", "dependencies"].contains(&category),
            "{alert}: category {category:?}"
        );
        let annotations = &rule["annotations"];
        assert_eq!(
            annotations["runbook_url"],
            format!("{RUNBOOKS}{}", alert.to_lowercase()),
            "{alert}"
        );
        for key in ["summary", "description"] {
            assert!(
                annotations[key].as_str().is_some_and(|t| !t.is_empty()),
                "{alert}: no {key}"
            );
        }
        assert!(rule["for"].is_string(), "{alert}: no for");
        for annotation in annotations.as_object().unwrap().values() {
            let text = annotation.as_str().unwrap();
            let unknown = unknown_names(text, &exposed, &recorded);
            assert!(unknown.is_empty(), "{alert} names unknown {unknown:?}");
        }
        assert!(
            test_text.contains(&format!("alertname: {alert}\n")),
            "no promtool test of {alert} in {RULE_TESTS}"
        );
        if alert == "AgentBusHighCostRate" {
            assert!(
                !expr.contains("rate(") && !expr.contains("increase("),
                "AgentBusHighCostRate fires from the gauges alone: {expr}"
            );
        }
    }
    assert_eq!(
        alerts,
        ALERTS
            .iter()
            .map(|a| (*a).to_owned())
            .collect::<std::collections::BTreeSet<String>>(),
        "the alerts of {RULES}"
    );
    let for_lines = text
        .lines()
        .filter(|line| {
            line.trim_start()
                .strip_prefix("for: ")
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_alphanumeric()))
        })
        .count();
    assert_eq!(
        for_lines, alert_rules,
        "one `for: <duration>` line per alert"
    );
}

#[test]
fn the_alertmanager_example_and_the_dashboard_are_valid_and_name_only_real_metrics() {
    let out = run(
        tool("amtool"),
        &["check-config", "deploy/alertmanager/alertmanager.yml"],
        None,
    );
    assert!(out.stdout.contains("SUCCESS"), "{}", out.stdout);
    // Routing: critical pages, warning to chat, info nowhere, cost also to finance.
    for (labels, receivers) in [
        (&["severity=critical", "category=availability"][..], "pager"),
        (&["severity=warning", "category=tasks"][..], "chat"),
        (&["severity=warning", "category=cost"][..], "finance,chat"),
        (&["severity=info", "category=cost"][..], "finance,null"),
        (&["severity=info", "category=capacity"][..], "null"),
    ] {
        let mut args = vec![
            "config",
            "routes",
            "test",
            "--config.file=deploy/alertmanager/alertmanager.yml",
        ];
        args.extend(labels);
        let out = run(tool("amtool"), &args, None);
        assert_eq!(out.stdout.trim(), receivers, "{labels:?}");
    }

    let text = std::fs::read_to_string(repo_root().join("deploy/grafana/agent-bus-dashboard.json"))
        .unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dashboard["schemaVersion"], 39);
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    for name in ["tenant", "queue"] {
        assert_eq!(variable(name)["datasource"]["uid"], "${datasource}");
    }
    let rules: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo_root().join(RULES)).unwrap())
            .unwrap();
    let recorded = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .filter_map(|rule| rule["record"].as_str().map(str::to_owned))
        .collect();
    let exposed = exposed_sample_names();
    let mut queries = Vec::new();
    dashboard_promql(&dashboard, &mut queries);
    let exprs = queries.iter().filter(|q| q.contains("agent_bus")).count();
    assert!(exprs > 40, "{exprs} expressions");
    for query in &queries {
        let unknown = unknown_names(query, &exposed, &recorded);
        assert!(
            unknown.is_empty(),
            "the dashboard names unknown {unknown:?} in {query}"
        );
    }
    // Every panel queries the data source variable.
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
        }
    }
}

// --- the image and docker-compose ------------------------------------------------------------

#[test]
fn the_dockerfile_passes_buildkits_checks_and_runs_non_root_with_a_shell_free_healthcheck() {
    let out = run(deploylint(), &["dockerfile", "Dockerfile"], None);
    let summary: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(summary["problems"], json!([]), "{}", out.stderr);
    let stages = summary["stages"].as_array().unwrap();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let runtime = stages.last().unwrap();
    assert_eq!(runtime["user"], "65532:65532");
    assert_eq!(
        runtime["healthcheck"],
        json!([
            "CMD",
            "/usr/local/bin/dispatcher",
            "healthcheck",
            "--url",
            "http://127.0.0.1:8080/readyz"
        ])
    );
    assert_eq!(
        runtime["entrypoint"],
        json!(["exec-form", "/usr/local/bin/dispatcher"])
    );
    let copies = runtime["copies_from"].to_string();
    for binary in ["/usr/local/bin/dispatcher", "/usr/local/bin/runner"] {
        assert!(
            copies.contains(binary),
            "{binary} not copied from the build stage: {copies}"
        );
    }
    // The build context leaves out the target folder and local state.
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    for line in ["*", "**/target/", "**/*.db"] {
        assert!(
            ignore.lines().any(|l| l == line),
            ".dockerignore lacks {line}"
        );
    }
    // The runner is built for glibc 2.31 (old CUDA and PyTorch user images) the way
    // tests/env/build-runner builds the binary the runner's tests check, with the same
    // pinned ziglang and cargo-zigbuild.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let versions = std::fs::read_to_string(repo_root().join("tests/env/versions.env")).unwrap();
    for name in ["ZIGLANG_VERSION", "CARGO_ZIGBUILD_VERSION"] {
        let pinned = versions
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("tests/env/versions.env has no {name}"));
        assert!(
            dockerfile
                .lines()
                .any(|l| l.trim() == format!("ARG {name}={pinned}")),
            "the Dockerfile does not pin {name}={pinned} like tests/env/versions.env"
        );
    }
    let build_runner = std::fs::read_to_string(repo_root().join("tests/env/build-runner")).unwrap();
    for (file, text, command) in [
        (
            "Dockerfile",
            &dockerfile,
            "cargo zigbuild --release --locked -p runner --target \"${runner_target}.2.31\"",
        ),
        (
            "tests/env/build-runner",
            &build_runner,
            "cargo zigbuild --release --locked -p runner --target \"$zig_target\"",
        ),
    ] {
        assert!(text.contains(command), "{file} no longer runs `{command}`");
    }
    assert!(build_runner.contains("zig_target=$rust_target.2.31"));
    assert!(
        dockerfile.contains("\"target/${runner_target}/release/runner\" /out/runner"),
        "the image's runner is not the glibc 2.31 build"
    );
    // What the HEALTHCHECK runs exists in the binary.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(["healthcheck", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--url"));
}

#[test]
fn docker_compose_passes_the_compose_loader_with_limits_and_health_checks() {
    let out = run(deploylint(), &["compose", "docker-compose.yml"], None);
    let project: Value = serde_json::from_str(&out.stdout).unwrap();
    let services = project["services"].as_object().unwrap();
    let names: Vec<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "alertmanager",
            "dispatcher",
            "grafana",
            "postgres",
            "prometheus",
            "redis"
        ]
    );
    for (name, service) in services {
        let limits = &service["deploy"]["resources"]["limits"];
        assert!(
            limits["cpus"].as_f64().unwrap() > 0.0,
            "{name}: no CPU limit"
        );
        assert!(
            limits["memory"].as_str().unwrap().parse::<u64>().unwrap() > 0,
            "{name}: no memory limit"
        );
        let test = service["healthcheck"]["test"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no health check"));
        assert_eq!(test[0], "CMD", "{name}: health check in exec form");
    }
    assert_eq!(
        services["dispatcher"]["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    assert_eq!(
        services["dispatcher"]["depends_on"]["redis"]["condition"],
        "service_healthy"
    );
    // The configuration files it mounts are valid for their programs.
    let prometheus = run(
        tool("promtool"),
        &["check", "config", "deploy/compose/prometheus.yml"],
        None,
    );
    assert!(
        prometheus.stdout.contains("SUCCESS"),
        "{}",
        prometheus.stdout
    );
    let alertmanager = run(
        tool("amtool"),
        &["check-config", "deploy/compose/alertmanager.yml"],
        None,
    );
    assert!(
        alertmanager.stdout.contains("SUCCESS"),
        "{}",
        alertmanager.stdout
    );
    // A misspelt key is refused (the loader validates against the Compose schema).
    let bad = std::env::temp_dir().join(format!("agent-bus-compose-{}.yml", unique_suffix()));
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    std::fs::write(
        &bad,
        text.replacen(
            "    restart: unless-stopped",
            "    restart: unless-stopped\n    restrat: always",
            1,
        ),
    )
    .unwrap();
    let refused = run_status(deploylint(), &["compose", bad.to_str().unwrap()], None);
    std::fs::remove_file(&bad).unwrap();
    assert!(!refused.success);
    assert!(refused.stderr.contains("restrat"), "{}", refused.stderr);
}
