//! Task pods as the chart configures them: a GPU task mounts the chart's models/datasets
//! claim by name and gets its class's CPU and memory; the tasks namespace's Pod Security
//! label follows the placement file's classes, so a `baseline` class's pod is refused
//! under `restricted` and admitted under the rendered label. Jobs are built by the
//! dispatcher's own `build_job` from the rendered placement file and checked by the test
//! API server (server-side dry-run).

use dispatcher::launcher::job_spec::{LaunchConfig, build_job};
use dispatcher::placement::PlacementCatalog;
use dispatcher::task::Task;
use dispatcher::task::submission::{Limits, Submission, validate};
use serde_json::{Value, json};

use crate::support::*;

const CLAIM: &str = "agent-bus-models-datasets";

/// The placement file of a rendering, as the dispatcher loads it.
fn rendered_catalog(rendered: &str) -> PlacementCatalog {
    let objects = parsed(rendered);
    let config = config_map(&objects);
    let text = config["data"]["placement.yaml"].as_str().unwrap();
    PlacementCatalog::parse(text, "placement.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// A GPU task of `tenant` without CPU or memory, with `volumes`, validated against the
/// catalog as the api validates it.
fn gpu_task(
    catalog: &PlacementCatalog,
    tenant: &str,
    class: &str,
    volumes: &Value,
) -> Result<Task, String> {
    let limits = Limits {
        gpu_classes: catalog.gpu_classes.capacities(),
        volume_claims: catalog.volume_claims.clone(),
        ..Limits::default()
    };
    let submission: Submission = serde_json::from_value(json!({
        "name": "finetune",
        "image": "registry.example.com/ml/finetune:1",
        "command": ["python", "train.py"],
        "resources": {"gpu": {"count": 1, "class": class}},
        "volumes": volumes,
    }))
    .unwrap();
    validate(submission, &limits, tenant)
        .map(|spec| Task::new(tenant, spec))
        .map_err(|e| e.to_string())
}

fn job_json(task: &Task, catalog: &PlacementCatalog, namespace: &str) -> Value {
    let config = LaunchConfig {
        namespace: namespace.to_owned(),
        gpu_classes: catalog.gpu_classes.clone(),
        ..LaunchConfig::default()
    };
    serde_json::to_value(build_job(task, &config, None).unwrap()).unwrap()
}

/// The pod a Job's template makes, named, in `namespace`.
fn pod_of(job: &Value, name: &str, namespace: &str) -> Value {
    let template = &job["spec"]["template"];
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    })
}

fn dry_run(object: &Value) -> Output {
    run_status(
        tool("kubectl"),
        &["apply", "--dry-run=server", "-o", "json", "-f", "-"],
        Some(&object.to_string()),
    )
}

#[test]
fn a_gpu_task_mounts_the_charts_models_claim_by_name_with_its_classs_resources() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_crds();
    let names = Names::unique("deploy-models");
    let rendered = helm_template_set(&names, None, &["gpuStorage.enabled=true"]);
    let catalog = rendered_catalog(&rendered);
    assert!(catalog.volume_claims.contains_key(CLAIM));

    // Mounted by name, read-only; every tenant may; writable is refused.
    let mount = json!([{"claim": CLAIM, "mount_path": "/models"}]);
    let task = gpu_task(&catalog, "acme", "a100", &mount).unwrap();
    let job = job_json(&task, &catalog, &names.tasks);
    let pod = &job["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["persistentVolumeClaim"]["claimName"] == CLAIM)
        .unwrap_or_else(|| panic!("no volume of {CLAIM}: {}", pod["volumes"]));
    assert_eq!(volume["persistentVolumeClaim"]["readOnly"], true);
    let mounted = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap();
    assert_eq!(mounted["mountPath"], "/models");
    assert_eq!(mounted["readOnly"], true);
    // The class's defaults (4000m, 8Gi) plus the automatic /dev/shm of an ML task.
    let resources = &pod["containers"][0]["resources"];
    assert_eq!(resources["requests"]["cpu"], "4");
    assert_eq!(resources["requests"], resources["limits"]);
    let shm = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "dshm")
        .map(|v| v["emptyDir"]["sizeLimit"].as_str().unwrap().to_owned());
    let memory: dispatcher::task::Memory = resources["requests"]["memory"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let shm_bytes = shm.map_or(0, |s| {
        s.parse::<dispatcher::task::Memory>().unwrap().bytes()
    });
    assert_eq!(memory.bytes(), (8 << 30) + shm_bytes, "{resources}");

    let writable = json!([{"claim": CLAIM, "mount_path": "/models", "read_only": false}]);
    let refused = gpu_task(&catalog, "acme", "a100", &writable).unwrap_err();
    assert!(refused.contains("volumes"), "{refused}");

    // gpuStorage.tenants and gpuStorage.writable reach the placement file.
    let restricted = rendered_catalog(&helm_template_set(
        &names,
        None,
        &[
            "gpuStorage.enabled=true",
            "gpuStorage.tenants={acme}",
            "gpuStorage.writable=true",
        ],
    ));
    assert!(gpu_task(&restricted, "acme", "a100", &writable).is_ok());
    assert!(gpu_task(&restricted, "globex", "a100", &mount).is_err());
    // Not mountable, or no claim: tasks cannot name it.
    for sets in [
        &["gpuStorage.enabled=true", "gpuStorage.mountable=false"][..],
        &[][..],
    ] {
        let without = rendered_catalog(&helm_template_set(&names, None, sets));
        assert!(without.volume_claims.is_empty(), "{sets:?}");
        assert!(gpu_task(&without, "acme", "a100", &mount).is_err());
    }

    // The API server admits the Job in the rendered (restricted) tasks namespace, with
    // its requests as built.
    let outcome = std::panic::catch_unwind(|| {
        server_side_dry_run(&rendered, &names);
        let out = dry_run(&job);
        assert!(out.success, "{}", out.stderr);
        assert!(!out.stderr.contains("Warning"), "{}", out.stderr);
        let answered: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(
            answered["spec"]["template"]["spec"]["containers"][0]["resources"],
            job["spec"]["template"]["spec"]["containers"][0]["resources"]
        );
    });
    delete_namespaces(&names);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// `config.placement` with the a100 class made `baseline`, running as root.
fn baseline_a100_values() -> String {
    let values = std::fs::read_to_string(repo_root().join("helm/agent-bus/values.yaml")).unwrap();
    let start = values.find("  placement: |\n").unwrap();
    let end = values[start..].find("    volume_claims: []\n").unwrap() + start;
    let placement = values[start..end].replacen(
        "    fallbacks: [h100]\n",
        "    fallbacks: [h100]\n        security: {profile: baseline, run_as_user: 0}\n",
        1,
    );
    assert!(placement.contains("profile: baseline"));
    format!("config:\n{placement}    volume_claims: []\n")
}

fn enforced(rendered: &str, tasks: &str) -> String {
    parsed(rendered)
        .into_iter()
        .find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == tasks)
        .unwrap()["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn the_tasks_namespaces_pod_security_follows_the_classes_and_admits_their_pods() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_crds();
    let strict = Names::unique("deploy-psa-restricted");
    let relaxed = Names::unique("deploy-psa-baseline");
    let restricted_rendering = helm_template(&strict, None);
    let baseline_rendering = helm_template_extra(&relaxed, None, &baseline_a100_values());
    assert_eq!(enforced(&restricted_rendering, &strict.tasks), "restricted");
    assert_eq!(enforced(&baseline_rendering, &relaxed.tasks), "baseline");
    // An operator's explicit choice is kept when no class needs less.
    let privileged = helm_template_set(&strict, None, &["tasks.podSecurity=privileged"]);
    assert_eq!(enforced(&privileged, &strict.tasks), "privileged");

    let catalog = rendered_catalog(&baseline_rendering);
    assert_eq!(
        catalog.gpu_classes.namespace_level(),
        dispatcher::placement::PodSecurityLevel::Baseline
    );
    let root_task = gpu_task(&catalog, "acme", "a100", &json!([])).unwrap();
    let plain_task = gpu_task(&catalog, "acme", "v100", &json!([])).unwrap();

    let outcome = std::panic::catch_unwind(|| {
        create_namespaces(&restricted_rendering, &strict);
        create_namespaces(&baseline_rendering, &relaxed);
        for (names, root_admitted) in [(&strict, false), (&relaxed, true)] {
            let root = pod_of(
                &job_json(&root_task, &catalog, &names.tasks),
                "root",
                &names.tasks,
            );
            assert_eq!(root["spec"]["securityContext"]["runAsUser"], 0);
            let plain = pod_of(
                &job_json(&plain_task, &catalog, &names.tasks),
                "plain",
                &names.tasks,
            );
            let out = dry_run(&plain);
            assert!(
                out.success,
                "{}: a restricted pod was refused: {}",
                names.tasks, out.stderr
            );
            let out = dry_run(&root);
            assert_eq!(
                out.success, root_admitted,
                "{}: {}",
                names.tasks, out.stderr
            );
            if !root_admitted {
                assert!(
                    out.stderr
                        .contains("violates PodSecurity \"restricted:latest\""),
                    "{}",
                    out.stderr
                );
            }
        }
    });
    delete_namespaces(&strict);
    delete_namespaces(&relaxed);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
