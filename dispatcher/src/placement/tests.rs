//! The placement file's rules, its shipped defaults and the fallback order.

use super::{PlacementCatalog, PlacementError};

const SHIPPED: &str = include_str!("../../config/placement.yaml");

#[test]
fn the_shipped_file_is_the_default() {
    let catalog = PlacementCatalog::parse(SHIPPED, "placement.yaml").unwrap();
    assert_eq!(catalog.gpu_classes, PlacementCatalog::default().gpu_classes);
}

fn refused(text: &str) -> String {
    match PlacementCatalog::parse(text, "p.yaml") {
        Err(PlacementError::Rule { field, message, .. }) => format!("{field}: {message}"),
        Err(other) => other.to_string(),
        Ok(_) => panic!("should be refused: {text}"),
    }
}

#[test]
fn bad_files_name_the_field() {
    let one = |extra: &str| {
        format!(
            "gpu_classes:\n- name: a100\n  node_selector: {{accelerator: a}}\n  resource_name: nvidia.com/gpu\n  per_node: 8\n  price_per_hour: 3.5\n{extra}"
        )
    };
    assert!(
        refused(&one("  fallbacks: [h100]\n"))
            .starts_with("gpu_classes[0].fallbacks[0]: names 'h100'")
    );
    assert!(refused(&one("  fallbacks: [a100]\n")).contains("itself"));
    assert!(refused(&one("  colour: red\n")).contains("unknown field `colour`"));
    assert!(
        refused(&one("  tolerations: [{key: k, operator: Maybe}]\n"))
            .starts_with("gpu_classes[0].tolerations[0].operator")
    );
    assert!(
        refused(&one("volume_claims:\n- name: models\n  tenants: []\n"))
            .starts_with("volume_claims[0].tenants")
    );
    assert!(refused("gpu_classes: []\n").starts_with("gpu_classes:"));
    let doubled = format!("{}{}", one(""), one("").replace("gpu_classes:\n", ""));
    assert!(refused(&doubled).starts_with("gpu_classes[1].name"));
    let zero = one("").replace("per_node: 8", "per_node: 0");
    assert!(refused(&zero).starts_with("gpu_classes[0].per_node"));
    let resource = one("").replace("nvidia.com/gpu", "gpu");
    assert!(refused(&resource).starts_with("gpu_classes[0].resource_name"));
}

#[test]
fn syntax_errors_name_line_and_column_and_yes_is_no_boolean() {
    let claim = "gpu_classes: []\nvolume_claims:\n- name: m\n  tenants: [a]\n  writable: yes\n";
    assert!(
        refused(claim).contains("line 5, column 13"),
        "{}",
        refused(claim)
    );
    assert!(refused("gpu_classes: [\n").starts_with("placement file p.yaml: "));
}

#[test]
fn fallbacks_follow_the_requested_class_order() {
    let classes = PlacementCatalog::default().gpu_classes;
    assert_eq!(
        classes
            .next_fallback("h100", "h100", 8)
            .map(|c| c.name.as_str()),
        Some("a100")
    );
    assert_eq!(classes.next_fallback("h100", "a100", 8), None);
    assert_eq!(classes.next_fallback("v100", "v100", 1), None);
    assert_eq!(classes.next_fallback("h100", "v100", 1), None);
}

#[test]
fn class_defaults_and_security_are_checked_and_name_the_class_and_field() {
    let class = |extra: &str| {
        format!(
            "gpu_classes:\n- name: a100\n  node_selector: {{accelerator: a}}\n  resource_name: nvidia.com/gpu\n  per_node: 8\n  price_per_hour: 3.5\n{extra}"
        )
    };
    let cases = [
        (
            "  defaults: {cpu: 4 cores}\n",
            "gpu_classes[0].defaults.cpu: class 'a100': '4 cores' is not a Kubernetes quantity",
        ),
        (
            "  defaults: {memory: 8GB}\n",
            "gpu_classes[0].defaults.memory: class 'a100': '8GB' is not a Kubernetes quantity",
        ),
        (
            "  defaults: {memory: \"0\"}\n",
            "gpu_classes[0].defaults.memory: class 'a100': must be greater than zero",
        ),
        (
            "  defaults: {cpu: 0.0001}\n",
            "gpu_classes[0].defaults.cpu: class 'a100': '0.0001' is finer than",
        ),
        (
            "  security: {run_as_user: 0}\n",
            "gpu_classes[0].security.run_as_user: class 'a100': 0 (root) is refused by the restricted profile",
        ),
        (
            "  security: {profile: baseline, run_as_user: -1}\n",
            "gpu_classes[0].security.run_as_user: class 'a100': must be a user id",
        ),
    ];
    for (extra, expected) in cases {
        let said = refused(&class(extra));
        assert!(said.starts_with(expected), "{extra}: {said}");
    }
    for unknown in [
        "  defaults: {gpu: 1}\n",
        "  security: {profile: privileged}\n",
    ] {
        assert!(
            PlacementCatalog::parse(&class(unknown), "p.yaml").is_err(),
            "{unknown}"
        );
    }
    let accepted = PlacementCatalog::parse(
        &class("  defaults: {cpu: 4000m, memory: 8Gi}\n  security: {profile: baseline, run_as_user: 0}\n"),
        "p.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let a100 = accepted.gpu_classes.get("a100").unwrap();
    // Bare YAML numbers are quantities too (`cpu: 4`, `cpu: 0.5`).
    for (written, millicores) in [("4", 4000), ("0.5", 500), ("\"2\"", 2000)] {
        let catalog = PlacementCatalog::parse(
            &class(&format!("  defaults: {{cpu: {written}}}\n")),
            "p.yaml",
        )
        .unwrap_or_else(|e| panic!("{written}: {e}"));
        let cpu = catalog.gpu_classes.get("a100").unwrap().default_cpu();
        assert_eq!(
            cpu.map(crate::k8s::quantity::Cpu::millicores),
            Some(millicores)
        );
    }
    assert_eq!(
        a100.default_cpu()
            .map(crate::k8s::quantity::Cpu::millicores),
        Some(4000)
    );
    assert_eq!(
        a100.default_memory()
            .map(crate::k8s::quantity::Memory::bytes),
        Some(8 << 30)
    );
    assert_eq!(
        accepted.gpu_classes.namespace_level(),
        super::PodSecurityLevel::Baseline
    );
}

#[test]
fn effective_requests_take_the_tasks_own_else_the_classs_defaults() {
    let classes = PlacementCatalog::default().gpu_classes;
    let cpu = |s: &str| Some(s.parse::<crate::k8s::quantity::Cpu>().unwrap());
    let memory = |s: &str| Some(s.parse::<crate::k8s::quantity::Memory>().unwrap());
    assert_eq!(
        classes.effective_requests(Some("a100"), None, None),
        (cpu("4"), memory("8Gi"))
    );
    assert_eq!(
        classes.effective_requests(Some("a100"), cpu("1"), None),
        (cpu("1"), memory("8Gi"))
    );
    assert_eq!(
        classes.effective_requests(Some("h100"), None, memory("64Gi")),
        (cpu("4"), memory("64Gi"))
    );
    // CPU tasks, and a class no longer configured: nothing added.
    assert_eq!(classes.effective_requests(None, None, None), (None, None));
    assert_eq!(
        classes.effective_requests(Some("tpu"), None, None),
        (None, None)
    );
    // The built-in classes are all restricted.
    assert_eq!(
        classes.namespace_level(),
        super::PodSecurityLevel::Restricted
    );
}
