//! The shipped placement file is the dispatcher's own, and the dispatcher accepts it.

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
