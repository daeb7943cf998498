//! Running the tools (kubectl, helm, deploylint), reading rendered YAML, and the
//! namespaces, CRDs and renderings every deployment test stands on.

use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use futures::FutureExt as _;
use serde_json::Value;
use testsupport::{TestNamespace, kube_client, unique_suffix};
pub(crate) use testsupport::{program_on_path as tool, repo_root};

// --- running tools ------------------------------------------------------------------------

/// `deploylint`: on the PATH that `tests/env/up` exports (tests that run it say so first
/// with `needs_env!(Program("deploylint"))`; `tests/env/build deploylint` builds it alone).
pub(crate) fn deploylint() -> PathBuf {
    tool("deploylint")
}

/// The `dispatcher` binary of this build: `cargo test --workspace` builds it beside this
/// test binary (`target/<profile>/dispatcher`, this binary being in `deps/` below it).
pub(crate) fn dispatcher_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("dispatcher"))
        .unwrap();
    assert!(
        binary.is_file(),
        "{} is missing: run the deployment tests with `cargo test --workspace`, or \
         `cargo build -p dispatcher` first",
        binary.display()
    );
    binary
}

pub(crate) struct Output {
    pub(crate) success: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs a program to the end; `stdin` is written to it when given.
pub(crate) fn run_status(program: impl AsRef<Path>, args: &[&str], stdin: Option<&str>) -> Output {
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
pub(crate) fn run(program: impl AsRef<Path>, args: &[&str], stdin: Option<&str>) -> Output {
    let shown = format!("{} {}", program.as_ref().display(), args.join(" "));
    let output = run_status(program, args, stdin);
    assert!(
        output.success,
        "`{shown}` failed\n--- stdout\n{}\n--- stderr\n{}",
        output.stdout, output.stderr
    );
    output
}

pub(crate) fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    run(tool("kubectl"), args, stdin)
}

pub(crate) fn helm(args: &[&str]) -> Output {
    run(tool("helm"), args, None)
}

// --- YAML documents -------------------------------------------------------------------------

/// The documents of a multi-document YAML stream (split on `---` lines), without empty ones.
pub(crate) fn yaml_docs(text: &str) -> Vec<String> {
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

pub(crate) fn kind_of(doc: &str) -> &str {
    doc.lines()
        .find_map(|l| l.strip_prefix("kind: "))
        .unwrap_or_default()
        .trim()
}

/// Rendered YAML as JSON objects, through `kubectl create --dry-run=client` (no YAML
/// parser needed, and the same decoding kubectl applies).
pub(crate) fn objects(yaml: &str) -> Vec<Value> {
    let out = kubectl(
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        Some(yaml),
    );
    serde_json::Deserializer::from_str(&out.stdout)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect()
}

pub(crate) fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
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
pub(crate) fn config_map(objects: &[Value]) -> &Value {
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
pub(crate) fn dispatcher_deployments(objects: &[Value]) -> Vec<&Value> {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" && dispatcher_container(o).is_some())
        .collect();
    assert_eq!(found.len(), 3, "three dispatcher Deployments");
    found
}

pub(crate) fn dispatcher_container(deployment: &Value) -> Option<&Value> {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "dispatcher")
}

/// The entry `name` of a container's `env`.
pub(crate) fn env_entry<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {}", container["env"]))
}

/// The literal value of a container's environment variable `name`.
pub(crate) fn env_value<'a>(container: &'a Value, name: &str) -> &'a str {
    env_entry(container, name)["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no literal value"))
}

// --- namespaces, CRDs, rendering --------------------------------------------------------------

/// The two namespaces of one installation, unique per test run.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) dispatcher: String,
    pub(crate) tasks: String,
}

impl Names {
    pub(crate) fn unique(prefix: &str) -> Self {
        let dispatcher = format!("{prefix}-{}", unique_suffix());
        let tasks = format!("{dispatcher}-tasks");
        Self { dispatcher, tasks }
    }

    /// The names every file ships with.
    pub(crate) fn defaults() -> Self {
        Self {
            dispatcher: "agent-bus".to_owned(),
            tasks: "agent-bus-tasks".to_owned(),
        }
    }

    pub(crate) fn service_account(&self) -> String {
        format!("system:serviceaccount:{}:agent-bus", self.dispatcher)
    }
}

/// `kubectl kustomize` of an overlay, with the namespace names of `base/namespaces.yaml`
/// replaced by `names` in a copy of the tree: the one place an installation names them.
pub(crate) fn kustomize(overlay: &str, names: &Names) -> String {
    kustomize_edited(&format!("overlays/{overlay}"), names, |_| {})
}

/// `kubectl kustomize` of `dir` (relative to `manifests/`) in a copy of the tree renamed to
/// `names`, after `edit` changed the copy (it gets the copy's `manifests/` folder).
pub(crate) fn kustomize_edited(dir: &str, names: &Names, edit: impl FnOnce(&Path)) -> String {
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

pub(crate) fn copy_tree(from: &Path, to: &Path) {
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
pub(crate) fn helm_template(names: &Names, values: Option<&str>) -> String {
    helm_template_set(names, values, &[])
}

/// `helm template` as above, with more `--set` values.
pub(crate) fn helm_template_set(names: &Names, values: Option<&str>, sets: &[&str]) -> String {
    let out = helm_template_status(names, values, sets, None);
    assert!(out.success, "helm template --set {sets:?}: {}", out.stderr);
    out.stdout
}

/// `helm template` as above, with one more values file holding `extra` (YAML), given last
/// so it wins: for values `--set` cannot spell (quotes, commas, lists of objects).
pub(crate) fn helm_template_extra(names: &Names, values: Option<&str>, extra: &str) -> String {
    let out = helm_template_status(names, values, &[], Some(extra));
    assert!(out.success, "helm template with {extra}: {}", out.stderr);
    out.stdout
}

/// What `helm template --set …` says when the chart refuses to render (its schema or a
/// `fail`): the error text, asserting it did refuse.
pub(crate) fn helm_template_refused(sets: &[&str]) -> String {
    let out = helm_template_status(&Names::defaults(), None, sets, None);
    assert!(!out.success, "helm template accepted --set {sets:?}");
    out.stderr
}

/// `helm template` of the chart into `names` with a values file, `--set` values and a
/// last values file of `extra` YAML, whatever its outcome.
fn helm_template_status(
    names: &Names,
    values: Option<&str>,
    sets: &[&str],
    extra: Option<&str>,
) -> Output {
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
    let extra_file =
        std::env::temp_dir().join(format!("agent-bus-values-{}.yaml", unique_suffix()));
    if let Some(extra) = extra {
        std::fs::write(&extra_file, extra).unwrap();
        args.extend(["-f", extra_file.to_str().unwrap()]);
    }
    let out = run_status(tool("helm"), &args, None);
    if extra.is_some() {
        std::fs::remove_file(&extra_file).unwrap();
    }
    out
}

/// Rendered YAML as JSON objects, parsed here (no cluster needed, CRD kinds included).
pub(crate) fn parsed(rendered: &str) -> Vec<Value> {
    yaml_docs(rendered).iter().map(|doc| yaml(doc)).collect()
}

/// One YAML document as a JSON value, read as Kubernetes reads it: YAML 1.2 booleans only
/// (`yes` stays a string), a key given twice is an error.
pub(crate) fn yaml(text: &str) -> Value {
    let options = serde_saphyr::options! {
        strict_booleans: true,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
    };
    serde_saphyr::from_str_with_options(text, options)
        .unwrap_or_else(|e| panic!("not YAML: {e}\n{text}"))
}

/// Creates the namespaces for real (as `restricted` as the installation asks, labelled as
/// test namespaces): the rendered Namespace objects, and for the chart, whose release
/// namespace is not one of its objects, a `restricted` release namespace.
pub(crate) fn create_namespaces(rendered: &str, names: &Names) {
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

pub(crate) fn delete_namespaces(names: &Names) {
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
pub(crate) async fn with_installation<F, Fut>(names: &Names, cleanup: impl FnOnce(), body: F)
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
/// (`tests/deploy/fixtures/crds.yaml`) and waits until the API server serves them.
pub(crate) fn ensure_crds() {
    install_crds(
        &[repo_root().join("tests/deploy/fixtures/crds.yaml")],
        &[
            "servicemonitors.monitoring.coreos.com",
            "prometheusrules.monitoring.coreos.com",
            "externalsecrets.external-secrets.io",
        ],
    );
}

/// Applies the CRD `files` (server-side, idempotent: every test may call it) and waits
/// until the API server serves each of `names`.
pub(crate) fn install_crds(files: &[PathBuf], names: &[&str]) {
    for file in files {
        kubectl(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager",
                "agent-bus-tests",
                "-f",
                file.to_str().unwrap(),
            ],
            None,
        );
    }
    let crds: Vec<String> = names.iter().map(|name| format!("crd/{name}")).collect();
    let mut args = vec!["wait", "--for", "condition=established", "--timeout", "90s"];
    args.extend(crds.iter().map(String::as_str));
    kubectl(&args, None);
}

/// A server-side dry-run of everything rendered (the namespaces exist for real first):
/// every object is admitted, and no Pod Security warning is printed.
pub(crate) fn server_side_dry_run(rendered: &str, names: &Names) -> Vec<Value> {
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
