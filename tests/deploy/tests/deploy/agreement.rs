//! The chart and the Kustomize overlays agree (RBAC, probes, security, resources), and
//! the runner image follows the dispatcher's image in both.

use std::collections::BTreeMap;

use crate::support::*;
use serde_json::{Value, json};

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
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_crds();
    let names = Names {
        dispatcher: "agent-bus".to_owned(),
        tasks: "agent-bus-tasks".to_owned(),
    };
    for (overlay, values) in [
        ("dev", "values-dev.yaml"),
        ("staging", "values-staging.yaml"),
        ("prod", "values-prod.yaml"),
    ] {
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

#[test]
fn the_runner_image_follows_the_dispatchers_image_and_the_report_secret_is_optional() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
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
    for overlay in ["dev", "staging", "prod"] {
        let rendered = kustomize_edited(&format!("overlays/{overlay}"), &names, |copy| {
            let file = copy.join(format!("overlays/{overlay}/kustomization.yaml"));
            let text = std::fs::read_to_string(&file).unwrap();
            // What the overlay sets: dev names the locally built image, the others a tag.
            let set = if overlay == "dev" {
                "    newName: localhost/agent-bus\n    newTag: dev\n"
            } else {
                "    newTag: 0.1.0\n"
            };
            let edited = text.replacen(
                set,
                "    newName: registry.example.com/agent-bus\n    newTag: 9.9.9\n",
                1,
            );
            assert_ne!(edited, text, "{overlay}: no `{set}` lines");
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
