//! The shipped placement file is the dispatcher's own, and the dispatcher accepts it;
//! where the chart or the overlay creates the shared models/datasets claim, the claim is
//! listed in it and a task mounts it by name.

use dispatcher::placement::PlacementCatalog;

use crate::support::*;

// --- the placement file, the report URL and the runner image --------------------------------

#[test]
fn the_shipped_placement_file_is_the_dispatchers_own_and_the_dispatcher_accepts_it() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    let expected =
        std::fs::read_to_string(repo_root().join("dispatcher/config/placement.yaml")).unwrap();
    // The file is the dispatcher's built-in default, so shipping it changes nothing.
    let parsed = PlacementCatalog::parse(&expected, "dispatcher/config/placement.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed, PlacementCatalog::default());
    ensure_crds();
    // With the models/datasets claim (gpuStorage, the gpu-storage component): the same
    // file with the claim listed, which the component ships as its own copy.
    let with_claim = std::fs::read_to_string(
        repo_root().join("manifests/components/gpu-storage/placement.yaml"),
    )
    .unwrap();
    assert_eq!(
        with_claim,
        expected.replace("volume_claims: []\n", MODELS_CLAIM),
        "manifests/components/gpu-storage/placement.yaml is not the shipped file with the claim"
    );
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
            "helm/agent-bus -f values-staging.yaml",
            helm_template(&names, Some("values-staging.yaml")),
        ),
        (
            "helm/agent-bus -f values-prod.yaml",
            helm_template(&names, Some("values-prod.yaml")),
        ),
        ("manifests/base", kustomize_edited("base", &names, |_| {})),
        ("manifests/overlays/dev", kustomize("dev", &names)),
        ("manifests/overlays/staging", kustomize("staging", &names)),
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
        let claimed = objects.iter().any(|o| o["kind"] == "PersistentVolumeClaim");
        let wanted = if claimed { &with_claim } else { &expected };
        assert!(
            text == wanted,
            "{source}: placement.yaml is not dispatcher/config/placement.yaml{}:\n{text}",
            if claimed { " with the claim" } else { "" }
        );
        let catalog = PlacementCatalog::parse(text, "placement.yaml")
            .unwrap_or_else(|e| panic!("{source}: the dispatcher refuses its placement.yaml: {e}"));
        let mut default = PlacementCatalog::default();
        if claimed {
            let claim = &catalog.volume_claims["agent-bus-models-datasets"];
            assert!(claim.allows("any-tenant") && !claim.writable, "{source}");
            default
                .volume_claims
                .insert(claim.name.clone(), claim.clone());
        }
        assert_eq!(catalog, default, "{source}");
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

/// The shipped file's `volume_claims: []` with the models/datasets claim listed.
const MODELS_CLAIM: &str = "volume_claims:\n  - name: agent-bus-models-datasets\n    tenants: [\"*\"]\n    writable: false\n";
