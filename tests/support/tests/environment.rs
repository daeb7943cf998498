//! Smoke suite for the test environment itself (`tests/env/up`): the fake node pools,
//! kwok's pod stages driving real Jobs through the real controllers and scheduler, RBAC,
//! the tools on the PATH, PostgreSQL and Redis. Every later integration test stands on
//! what these prove.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, Node, Pod, PodSpec, PodTemplateSpec, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};
use redis::AsyncCommands as _;
use sqlx::{Connection as _, PgConnection};
use testsupport::{
    CLUSTER_TIMEOUT, TestNamespace, kube_client, poll_until, with_database, with_namespace,
    with_redis_keyspace,
};

const GPU_TAINT: &str = "nvidia.com/gpu";

/// A Job fixture, built fluently: `TestJob::new("x").gpus(1).accelerator("…").obj()`.
#[derive(Default)]
struct TestJob {
    name: String,
    node_selector: BTreeMap<String, String>,
    resources: BTreeMap<String, Quantity>,
    annotations: BTreeMap<String, String>,
    gpu_toleration: bool,
}

impl TestJob {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    fn accelerator(mut self, value: &str) -> Self {
        self.node_selector
            .insert("accelerator".into(), value.into());
        self.gpu_toleration = true;
        self
    }

    fn resource(mut self, name: &str, amount: &str) -> Self {
        self.resources.insert(name.into(), Quantity(amount.into()));
        self
    }

    fn gpus(self, count: u32) -> Self {
        let with_toleration = Self {
            gpu_toleration: true,
            ..self
        };
        with_toleration.resource("nvidia.com/gpu", &count.to_string())
    }

    fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    fn obj(self) -> Job {
        let tolerations = self.gpu_toleration.then(|| {
            vec![Toleration {
                key: Some(GPU_TAINT.into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            }]
        });
        let resources = (!self.resources.is_empty()).then(|| ResourceRequirements {
            limits: Some(self.resources.clone()),
            requests: Some(self.resources),
            ..ResourceRequirements::default()
        });
        Job {
            metadata: ObjectMeta {
                name: Some(self.name),
                ..ObjectMeta::default()
            },
            spec: Some(JobSpec {
                backoff_limit: Some(0),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        annotations: Some(self.annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".into()),
                        node_selector: Some(self.node_selector),
                        tolerations,
                        containers: vec![Container {
                            name: "task".into(),
                            image: Some("registry.invalid/agent-bus/test:1".into()),
                            command: Some(vec!["true".into()]),
                            resources,
                            ..Container::default()
                        }],
                        ..PodSpec::default()
                    }),
                },
                ..JobSpec::default()
            }),
            ..Job::default()
        }
    }
}

async fn create_job(ns: &TestNamespace, job: Job) -> String {
    let name = job.metadata.name.clone().unwrap();
    ns.api::<Job>()
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    name
}

/// The one pod of `job`, once `accept` holds for it.
async fn wait_for_pod(
    ns: &TestNamespace,
    job: &str,
    what: &str,
    accept: impl Fn(&Pod) -> bool,
) -> Pod {
    let pods = ns.api::<Pod>();
    let selector = ListParams::default().labels(&format!("job-name={job}"));
    poll_until(what, CLUSTER_TIMEOUT, || async {
        let list = pods.list(&selector).await.map_err(|e| e.to_string())?;
        match list.items.as_slice() {
            [pod] if accept(pod) => Ok(pod.clone()),
            [pod] => Err(testsupport::pod_report(pod)),
            [] => Err("no pod yet".to_owned()),
            many => Err(format!("{} pods", many.len())),
        }
    })
    .await
}

/// Waits until `job` has the condition `type_` with status True.
async fn wait_for_job_condition(ns: &TestNamespace, job: &str, type_: &str) -> Job {
    let jobs = ns.api::<Job>();
    poll_until(
        &format!("job {job} condition {type_}"),
        CLUSTER_TIMEOUT,
        || async {
            let current = jobs.get(job).await.map_err(|e| e.to_string())?;
            let conditions = current
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            if conditions
                .iter()
                .any(|c| c.type_ == type_ && c.status == "True")
            {
                Ok(current)
            } else {
                Err(format!(
                    "conditions: {:?}",
                    conditions
                        .iter()
                        .map(|c| (&c.type_, &c.status))
                        .collect::<Vec<_>>()
                ))
            }
        },
    )
    .await
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn terminated_exit_code(pod: &Pod) -> Option<i32> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {program}: {e} (is the test environment's PATH exported?)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{program} {args:?} failed: {text}");
    text
}

/// The versions `tests/env/build` built, from `tests/env/versions.env`.
fn pinned_version(key: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../env/versions.env");
    let text = std::fs::read_to_string(path).unwrap();
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} not in {path}"));
    value
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn fake_nodes_are_ready_with_their_pools_labels_taints_and_capacity() {
    testsupport::needs_env!(Cluster);
    let nodes: Api<Node> = Api::all(kube_client().await.unwrap());
    let list = nodes
        .list(&ListParams::default().labels("type=kwok"))
        .await
        .unwrap();
    // (pool, node count, accelerator label, GPU resource, GPUs per node)
    let pools = [
        ("cpu", 3, None, None, 0),
        (
            "gpu-v100",
            2,
            Some("nvidia-tesla-v100"),
            Some("nvidia.com/gpu"),
            8,
        ),
        (
            "gpu-a100",
            2,
            Some("nvidia-tesla-a100"),
            Some("nvidia.com/gpu"),
            8,
        ),
        (
            "gpu-h100",
            1,
            Some("nvidia-h100-80gb"),
            Some("nvidia.com/gpu"),
            8,
        ),
        (
            "gpu-a100-mig",
            1,
            Some("nvidia-tesla-a100"),
            Some("nvidia.com/mig-1g.10gb"),
            7,
        ),
    ];
    assert_eq!(list.items.len(), 9, "nine fake nodes");
    for (pool, count, accelerator, gpu_resource, gpus) in pools {
        let members: Vec<&Node> = list
            .items
            .iter()
            .filter(|n| {
                n.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("agent-bus.io/pool"))
                    .map(String::as_str)
                    == Some(pool)
            })
            .collect();
        assert_eq!(members.len(), count, "pool {pool}");
        for node in members {
            let name = node.metadata.name.clone().unwrap();
            let labels = node.metadata.labels.clone().unwrap();
            assert_eq!(
                labels.get("accelerator").map(String::as_str),
                accelerator,
                "{name} accelerator label"
            );
            let status = node.status.clone().unwrap();
            let ready = status
                .conditions
                .unwrap()
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .unwrap();
            assert_eq!(ready.status, "True", "{name} Ready");
            let taints = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            let gpu_taint = taints.iter().any(|t| {
                t.key == GPU_TAINT && t.value.as_deref() == Some("true") && t.effect == "NoSchedule"
            });
            assert_eq!(
                gpu_taint,
                accelerator.is_some(),
                "{name} GPU taint: {taints:?}"
            );
            assert!(
                !taints
                    .iter()
                    .any(|t| t.key.starts_with("node.kubernetes.io/")),
                "{name} still tainted: {taints:?}"
            );
            let allocatable = status.allocatable.unwrap();
            if let Some(resource) = gpu_resource {
                assert_eq!(
                    allocatable.get(resource),
                    Some(&Quantity(gpus.to_string())),
                    "{name} {resource}"
                );
            }
            assert_eq!(
                allocatable.get("cpu"),
                Some(&Quantity("64".into())),
                "{name} cpu"
            );
        }
    }
}

#[tokio::test]
async fn a100_job_is_bound_to_an_a100_node_and_completes() {
    testsupport::needs_env!(Cluster);
    with_namespace("smoke-a100", |ns| async move {
        let job = create_job(
            &ns,
            TestJob::new("a100-one")
                .accelerator("nvidia-tesla-a100")
                .gpus(1)
                .obj(),
        )
        .await;
        let done = wait_for_job_condition(&ns, &job, "Complete").await;
        assert_eq!(done.status.unwrap().succeeded, Some(1));
        let pod = wait_for_pod(&ns, &job, "the succeeded pod", |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
        })
        .await;
        let node = node_of(&pod);
        assert!(
            node.starts_with("gpu-a100-") && !node.starts_with("gpu-a100-mig"),
            "bound to {node}"
        );
        assert_eq!(terminated_exit_code(&pod), Some(0));
    })
    .await;
}

#[tokio::test]
async fn mig_slice_job_lands_on_the_mig_node() {
    testsupport::needs_env!(Cluster);
    with_namespace("smoke-mig", |ns| async move {
        let job = TestJob::new("mig-slice")
            .accelerator("nvidia-tesla-a100")
            .resource("nvidia.com/mig-1g.10gb", "1");
        let job = create_job(&ns, job.obj()).await;
        wait_for_job_condition(&ns, &job, "Complete").await;
        let pod = wait_for_pod(&ns, &job, "the pod", |_| true).await;
        assert_eq!(node_of(&pod), "gpu-a100-mig-0");
    })
    .await;
}

#[tokio::test]
async fn exit_code_annotation_fails_the_job_with_that_exit_code() {
    testsupport::needs_env!(Cluster);
    with_namespace("smoke-exit", |ns| async move {
        let job = TestJob::new("exit-three").annotation("agent-bus.io/test-exit-code", "3");
        let job = create_job(&ns, job.obj()).await;
        let failed = wait_for_job_condition(&ns, &job, "Failed").await;
        assert_eq!(failed.status.unwrap().failed, Some(1));
        let pod = wait_for_pod(&ns, &job, "the failed pod", |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
        })
        .await;
        assert_eq!(terminated_exit_code(&pod), Some(3));
        assert!(
            node_of(&pod).starts_with("cpu-"),
            "a CPU task lands on the CPU pool"
        );
    })
    .await;
}

#[tokio::test]
async fn run_seconds_annotation_keeps_the_pod_running_that_long() {
    testsupport::needs_env!(Cluster);
    with_namespace("smoke-slow", |ns| async move {
        let job = TestJob::new("slow").annotation("agent-bus.io/test-run-seconds", "4");
        let job = create_job(&ns, job.obj()).await;
        let running = wait_for_pod(&ns, &job, "the running pod", |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .await;
        assert!(running.status.unwrap().start_time.is_some());
        wait_for_job_condition(&ns, &job, "Complete").await;
        let pod = wait_for_pod(&ns, &job, "the succeeded pod", |p| {
            terminated_exit_code(p).is_some()
        })
        .await;
        let statuses = pod.status.unwrap().container_statuses.unwrap();
        let terminated = statuses[0].state.clone().unwrap().terminated.unwrap();
        let ran = terminated.finished_at.unwrap().0.as_second()
            - terminated.started_at.unwrap().0.as_second();
        // Timestamps have whole-second resolution, so 4 s of running shows as 3 to 5.
        assert!(ran >= 3, "pod ran {ran}s, expected about 4s");
    })
    .await;
}

#[tokio::test]
async fn sixteen_gpus_in_one_pod_stay_pending_unschedulable() {
    testsupport::needs_env!(Cluster);
    with_namespace("smoke-16gpu", |ns| async move {
        let job = create_job(&ns, TestJob::new("too-big").gpus(16).obj()).await;
        let pod = wait_for_pod(&ns, &job, "PodScheduled=False reason Unschedulable", |p| {
            let status = p.status.clone().unwrap_or_default();
            status.phase.as_deref() == Some("Pending")
                && status.conditions.unwrap_or_default().iter().any(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
        })
        .await;
        assert!(node_of(&pod).is_empty());
    })
    .await;
}

#[tokio::test]
async fn kubectl_get_jobs_lists_them() {
    testsupport::needs_env!(Cluster, Program("kubectl"));
    with_namespace("smoke-kubectl", |ns| async move {
        let first = create_job(&ns, TestJob::new("listed-one").obj()).await;
        let second = create_job(&ns, TestJob::new("listed-two").obj()).await;
        wait_for_job_condition(&ns, &first, "Complete").await;
        wait_for_job_condition(&ns, &second, "Complete").await;
        let table = run("kubectl", &["get", "jobs", "-n", &ns.name]);
        for job in [&first, &second] {
            let line = table
                .lines()
                .find(|l| l.starts_with(job.as_str()))
                .unwrap_or_else(|| panic!("{job} missing:\n{table}"));
            assert!(line.contains("Complete"), "{line}");
        }
    })
    .await;
}

#[tokio::test]
async fn rbac_is_enforced_for_service_accounts() {
    testsupport::needs_env!(Cluster, Program("kubectl"));
    with_namespace("smoke-rbac", |ns| async move {
        let account = format!("system:serviceaccount:{}:default", ns.name);
        let can = |verb: &str, resource: &str| {
            let output = Command::new("kubectl")
                .args([
                    "auth", "can-i", verb, resource, "-n", &ns.name, "--as", &account,
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        };
        assert_eq!(can("create", "jobs"), "no");
        assert_eq!(can("get", "secrets"), "no");
        assert_eq!(
            run(
                "kubectl",
                &["auth", "can-i", "create", "jobs", "-n", &ns.name]
            )
            .trim(),
            "yes"
        );
    })
    .await;
}

#[test]
fn tools_of_the_pinned_versions_are_on_the_path() {
    testsupport::needs_env!(
        Cluster,
        Program("kubectl"),
        Program("helm"),
        Program("prometheus"),
        Program("promtool"),
        Program("alertmanager")
    );
    let kubernetes = pinned_version("KUBERNETES_VERSION");
    let client = run("kubectl", &["version", "--client"]);
    assert!(
        client.contains(&format!("Client Version: {kubernetes}")),
        "{client}"
    );
    let server = run("kubectl", &["version"]);
    assert!(
        server.contains(&format!("Server Version: {kubernetes}")),
        "{server}"
    );
    let helm = run("helm", &["version", "--short"]);
    assert!(helm.starts_with(&pinned_version("HELM_VERSION")), "{helm}");
    let prometheus_version = pinned_version("PROMETHEUS_MODULE_VERSION");
    // Module v0.3MM.P is Prometheus 3.MM.P.
    let minor_patch = prometheus_version.trim_start_matches("v0.3");
    let (minor, patch) = minor_patch.split_once('.').unwrap();
    let expected = format!("version 3.{}.{patch}", minor.parse::<u32>().unwrap());
    for program in ["prometheus", "promtool"] {
        let text = run(program, &["--version"]);
        assert!(text.contains(&expected), "{program}: {text}");
    }
    let alertmanager = run("alertmanager", &["--version"]);
    let expected = format!(
        "version {}",
        pinned_version("ALERTMANAGER_VERSION").trim_start_matches('v')
    );
    assert!(alertmanager.contains(&expected), "{alertmanager}");
}

#[tokio::test]
async fn each_test_gets_its_own_postgres_database() {
    testsupport::needs_env!(Postgres);
    with_database(|first| async move {
        with_database(|second| async move {
            assert_ne!(first.name, second.name);
            let mut a = PgConnection::connect(&first.url).await.unwrap();
            sqlx::query("CREATE TABLE marker (id int)")
                .execute(&mut a)
                .await
                .unwrap();
            let mut b = PgConnection::connect(&second.url).await.unwrap();
            let found: Option<String> = sqlx::query_scalar("SELECT to_regclass('marker')::text")
                .fetch_one(&mut b)
                .await
                .unwrap();
            assert_eq!(
                found, None,
                "a table of one test database is invisible in another"
            );
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn each_test_gets_its_own_redis_key_space() {
    testsupport::needs_env!(Redis);
    let leftover = with_redis_keyspace(|space| async move {
        let mut redis = space.connection().await.unwrap();
        let () = redis.set(space.key("marker"), "1").await.unwrap();
        let prefix = space.prefix.clone();
        with_redis_keyspace(|other| async move {
            assert_ne!(other.prefix, prefix);
            assert!(other.keys().await.unwrap().is_empty());
        })
        .await;
        assert_eq!(space.keys().await.unwrap(), vec![space.key("marker")]);
        space
    })
    .await;
    assert!(
        leftover.keys().await.unwrap().is_empty(),
        "keys are deleted afterwards"
    );
}
