//! The Job spec on representative tasks: snapshots, and tables of what each input changes.

use super::{LaunchConfig, ReportAccess, build_job, job_name};
use crate::task::WorkloadKind;
use crate::task::fixtures::TaskFixture;
use crate::task::submission::is_dns_label;

fn report() -> ReportAccess {
    ReportAccess {
        url: "http://agent-bus.agent-bus.svc:8080/internal/v1/tasks/0190a5d6-7b8c-7d00-8e4f-1a2b3c4d5e6f/attempts/1/reports".into(),
        token: "abr1.test-token".into(),
    }
}

fn job(task: &crate::task::Task) -> k8s_openapi::api::batch::v1::Job {
    build_job(task, &LaunchConfig::default(), Some(&report())).unwrap()
}

#[test]
fn job_names_are_dns_labels_short_enough_for_pod_names() {
    let task = TaskFixture::new().attempt(999).obj();
    let name = job_name(&task.id, task.attempt);
    assert!(is_dns_label(&name), "{name}");
    // Pods append '-' and 5 characters.
    assert!(name.len() + 6 <= 63, "{name}");
}

#[test]
fn the_same_task_builds_the_same_job() {
    let task = TaskFixture::new().gpus(2, "a100").obj();
    let rendered = |t| serde_json::to_string(&job(t)).unwrap();
    assert_eq!(rendered(&task), rendered(&task));
}

#[test]
fn cpu_task() {
    let task = TaskFixture::new()
        .cpu("500m")
        .memory("1Gi")
        .env("MODE", "fast")
        .label("example.com/team", "vision")
        .obj();
    insta::assert_yaml_snapshot!(job(&task));
}

#[test]
fn secret_references_become_secret_key_refs() {
    let task = TaskFixture::new()
        .env("MODE", "fast")
        .secret_env("OPENAI_API_KEY", "openai", "token")
        .secret_env("HF_TOKEN", "hugging-face", "hf.token")
        .obj();
    insta::assert_yaml_snapshot!(job(&task));
}

#[test]
fn one_v100() {
    let task = TaskFixture::new()
        .cpu("4")
        .memory("16Gi")
        .gpus(1, "v100")
        .workload(WorkloadKind::Ml)
        .shm("4Gi")
        .obj();
    insta::assert_yaml_snapshot!(job(&task));
}

#[test]
fn eight_a100_with_shm_and_claims_in_a_kueue_cluster() {
    let task = TaskFixture::new()
        .cpu("32")
        .memory("256Gi")
        .gpus(8, "a100")
        .workload(WorkloadKind::Ml)
        .shm("16Gi")
        .volume("models", "/models", true)
        .volume("datasets", "/data", false)
        .scratch("500Gi")
        .attempt(2)
        .obj();
    let config = LaunchConfig {
        kueue_queue_name: Some("gpu-training".into()),
        scratch_storage_class: Some("fast-nvme".into()),
        ..LaunchConfig::default()
    };
    insta::assert_yaml_snapshot!(build_job(&task, &config, Some(&report())).unwrap());
}

#[test]
fn mig_slice() {
    let task = TaskFixture::new()
        .gpus(1, "a100-mig-1g.10gb")
        .workload(WorkloadKind::Cv)
        .shm("1Gi")
        .annotation("example.com/owner", "ml-team")
        .obj();
    insta::assert_yaml_snapshot!(job(&task));
}

#[test]
fn h100_fallen_back_to_a100() {
    let task = TaskFixture::new()
        .cpu("16")
        .memory("128Gi")
        .gpus(8, "h100")
        .placed_on("a100")
        .workload(WorkloadKind::Ml)
        .shm("16Gi")
        .attempt(2)
        .obj();
    insta::assert_yaml_snapshot!(job(&task));
}

#[test]
fn a_retry_after_an_xid_avoids_the_failed_node() {
    let mut task = TaskFixture::new()
        .memory("24Gi")
        .gpus(1, "a100")
        .attempt(3)
        .obj();
    task.avoid_nodes = vec!["gpu-a100-0".to_owned(), "gpu-a100-3".to_owned()];
    let job = job(&task);
    let pod = job.spec.unwrap().template.spec.unwrap();
    let affinity = serde_json::to_value(pod.affinity).unwrap();
    assert_eq!(
        affinity,
        serde_json::json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [{
                "key": "metadata.name", "operator": "NotIn",
                "values": ["gpu-a100-0", "gpu-a100-3"]
            }]}]
        }}})
    );
    assert_eq!(
        pod.node_selector
            .unwrap()
            .get("accelerator")
            .map(String::as_str),
        Some("nvidia-tesla-a100")
    );
    assert!(TaskFixture::new().obj().avoid_nodes.is_empty());
}

#[test]
fn without_a_report_endpoint_the_runner_still_wraps_the_command() {
    let task = TaskFixture::new().obj();
    let job = build_job(&task, &LaunchConfig::default(), None).unwrap();
    let pod = job.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        container.command.as_deref().unwrap()[..3],
        [
            "/agent-bus/bin/runner".to_owned(),
            "--".into(),
            "python".into()
        ]
    );
    let env = container.env.as_deref().unwrap();
    assert!(env.iter().all(|e| !e.name.starts_with("AGENT_BUS_REPORT")));
}

#[test]
fn an_unconfigured_class_is_an_error_not_a_panic() {
    let task = TaskFixture::new().gpus(1, "tpu").obj();
    assert!(build_job(&task, &LaunchConfig::default(), None).is_err());
}

/// The task container's resources as `(cpu request, memory request, memory limit)`.
fn cpu_and_memory(
    job: &k8s_openapi::api::batch::v1::Job,
) -> (Option<String>, Option<String>, Option<String>) {
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let resources = pod.containers[0].resources.clone().unwrap_or_default();
    let get = |map: &Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
               key: &str| {
        map.as_ref().and_then(|m| m.get(key)).map(|q| q.0.clone())
    };
    (
        get(&resources.requests, "cpu"),
        get(&resources.requests, "memory"),
        get(&resources.limits, "memory"),
    )
}

#[test]
fn a_gpu_task_without_cpu_or_memory_gets_its_class_defaults_plus_shm() {
    let some = |s: &str| Some(s.to_owned());
    // (task, cpu request, memory request = limit)
    let cases = [
        // The built-in GPU classes' defaults: 4000m and 8Gi, shm on top.
        (
            TaskFixture::new().gpus(1, "a100").obj(),
            some("4"),
            some("8Gi"),
        ),
        (
            TaskFixture::new().gpus(1, "a100").shm("2Gi").obj(),
            some("4"),
            some("10Gi"),
        ),
        (
            TaskFixture::new()
                .gpus(1, "a100-mig-1g.10gb")
                .shm("512Mi")
                .obj(),
            some("4"),
            some("8704Mi"),
        ),
        // What the task names wins, field by field.
        (
            TaskFixture::new().gpus(1, "v100").cpu("500m").obj(),
            some("500m"),
            some("8Gi"),
        ),
        (
            TaskFixture::new()
                .gpus(1, "v100")
                .memory("2Gi")
                .shm("1Gi")
                .obj(),
            some("4"),
            some("3Gi"),
        ),
        // The defaults of the class it runs on (a fallback), not the one it asked for.
        (
            TaskFixture::new().gpus(8, "h100").placed_on("a100").obj(),
            some("4"),
            some("8Gi"),
        ),
        // CPU tasks have no class: nothing is added (the namespace's LimitRange applies).
        (TaskFixture::new().obj(), None, None),
        (TaskFixture::new().shm("1Gi").obj(), None, None),
    ];
    for (task, cpu, memory) in cases {
        let job = job(&task);
        assert_eq!(
            cpu_and_memory(&job),
            (cpu, memory.clone(), memory),
            "{:?}",
            task.spec.resources
        );
    }
}

#[test]
fn a_class_without_defaults_adds_nothing() {
    let mut config = LaunchConfig::default();
    let mut classes: Vec<crate::placement::GpuClass> = config.gpu_classes.iter().cloned().collect();
    for class in &mut classes {
        class.defaults = crate::placement::ClassDefaults {
            cpu: None,
            memory: Some("16Gi".into()),
        };
    }
    config.gpu_classes = crate::placement::GpuClasses::new(classes);
    let task = TaskFixture::new().gpus(1, "a100").shm("1Gi").obj();
    let job = build_job(&task, &config, None).unwrap();
    assert_eq!(
        cpu_and_memory(&job),
        (None, Some("17Gi".into()), Some("17Gi".into()))
    );
}

/// The default classes, with `a100` given `security`.
fn config_with_a100_security(security: crate::placement::ClassSecurity) -> LaunchConfig {
    let mut config = LaunchConfig::default();
    let classes = config
        .gpu_classes
        .iter()
        .cloned()
        .map(|mut class| {
            if class.name == "a100" {
                class.security = security;
            }
            class
        })
        .collect();
    config.gpu_classes = crate::placement::GpuClasses::new(classes);
    config
}

#[test]
fn a_baseline_class_may_run_as_root_and_keeps_the_runtimes_capabilities() {
    use crate::placement::{ClassSecurity, PodSecurityLevel};
    let root = config_with_a100_security(ClassSecurity {
        profile: PodSecurityLevel::Baseline,
        run_as_user: Some(0),
    });
    let pod_of = |task: &crate::task::Task, config: &LaunchConfig| {
        let job = build_job(task, config, None).unwrap();
        serde_json::to_value(job.spec.unwrap().template.spec.unwrap()).unwrap()
    };
    // (task, config, pod securityContext, task container securityContext)
    let restricted_container = serde_json::json!({
        "allowPrivilegeEscalation": false, "privileged": false, "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}
    });
    let cases = [
        (
            TaskFixture::new().gpus(1, "a100").obj(),
            &root,
            serde_json::json!({"runAsNonRoot": false, "runAsUser": 0, "runAsGroup": 0,
                "fsGroup": 0, "seccompProfile": {"type": "RuntimeDefault"}}),
            serde_json::json!({"allowPrivilegeEscalation": false, "privileged": false,
                "seccompProfile": {"type": "RuntimeDefault"}}),
        ),
        // Other classes and CPU tasks stay restricted under the same configuration.
        (
            TaskFixture::new().gpus(1, "v100").obj(),
            &root,
            serde_json::json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}),
            restricted_container.clone(),
        ),
        (
            TaskFixture::new().obj(),
            &root,
            serde_json::json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}),
            restricted_container.clone(),
        ),
    ];
    for (task, config, pod_context, container_context) in cases {
        let pod = pod_of(&task, config);
        assert_eq!(
            pod["securityContext"], pod_context,
            "{:?}",
            task.spec.resources
        );
        assert_eq!(pod["containers"][0]["securityContext"], container_context);
        // The runner's init container is ours: always restricted, and never root (under
        // a root pod it runs as the launcher's user, which the kubelet's runAsNonRoot
        // check needs).
        let mut runner = restricted_container.clone();
        if pod_context["runAsUser"] == 0 {
            runner["runAsUser"] = 65532.into();
            runner["runAsGroup"] = 65532.into();
        }
        assert_eq!(pod["initContainers"][0]["securityContext"], runner);
    }
    // A restricted class with its own (non-root) user.
    let user = config_with_a100_security(ClassSecurity {
        profile: PodSecurityLevel::Restricted,
        run_as_user: Some(1000),
    });
    let pod = pod_of(&TaskFixture::new().gpus(1, "a100").obj(), &user);
    assert_eq!(pod["securityContext"]["runAsUser"], 1000);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["containers"][0]["securityContext"],
        restricted_container
    );
}
