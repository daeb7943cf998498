//! Placement: where a task may run and what its pod needs to run well there.
//!
//! - GPU classes (Kueue's ResourceFlavor idea): a class name in a submission (`a100`)
//!   becomes a node selector, tolerations, the extended resource to request, a price, and
//!   an ordered list of fallback classes. Operators describe them in the placement file
//!   (`--placement-file`, YAML); [`PlacementCatalog::default`] is the shipped default,
//!   identical to `dispatcher/config/placement.yaml`.
//! - Shared volume claims: which existing PersistentVolumeClaims (models, datasets) which
//!   tenants may mount, and whether they may ever mount them writable.
//! - Workload kinds (`ml`, `cv`, `cpu`) are the task's own ([`crate::task::workload`]).
//!
//! Invariants: class and claim names are unique; every class requests exactly one
//! extended resource and can hold at least one GPU per node; every fallback names another
//! configured class; the shipped defaults match the node pools of the test environment
//! (`tests/env`) and the labels and taints of the NVIDIA GPU operator. A file that breaks
//! a rule is refused at start with an error naming the entry and the field.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A toleration, in the shape Kubernetes uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    pub key: String,
    /// `Exists` or `Equal`.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; `None` tolerates all effects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
}

/// One GPU class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuClass {
    pub name: String,
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// The extended resource a pod requests: `nvidia.com/gpu` or a MIG profile such as
    /// `nvidia.com/mig-1g.10gb`.
    pub resource_name: String,
    /// The most GPUs (or slices) one node of the class holds.
    pub per_node: u32,
    /// Dollars per GPU (or slice) hour.
    pub price_per_hour: f64,
    /// Classes to try next, in order, when this one cannot place a task.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

/// An existing PersistentVolumeClaim in the tasks namespace that tenants may mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedClaim {
    /// The claim's name in the tasks namespace.
    pub name: String,
    /// Tenants allowed to mount it; `*` means every tenant.
    pub tenants: Vec<String>,
    /// Whether a tenant may mount it writable (`read_only: false` in the submission).
    /// Mounts are read-only unless asked otherwise.
    #[serde(default)]
    pub writable: bool,
}

impl SharedClaim {
    #[must_use]
    pub fn allows(&self, tenant: &str) -> bool {
        self.tenants.iter().any(|t| t == "*" || t == tenant)
    }
}

/// The placement file as written (`--placement-file`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementFile {
    pub gpu_classes: Vec<GpuClass>,
    /// GPU classes from least to most memory per GPU: where a task that ran out of GPU
    /// memory (`cuda_oom`) moves on retry. Classes not listed are never moved to.
    #[serde(default)]
    pub gpu_memory_order: Vec<String>,
    #[serde(default)]
    pub volume_claims: Vec<SharedClaim>,
}

/// The placement file broke a rule.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("placement file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("placement file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("placement file {path}: {field}: {message}")]
    Rule {
        path: String,
        field: String,
        message: String,
    },
}

/// The configured GPU classes, by name.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuClasses {
    classes: BTreeMap<String, GpuClass>,
    /// Class names from least to most memory per GPU.
    memory_order: Vec<String>,
}

fn nvidia_taint() -> Toleration {
    Toleration {
        key: "nvidia.com/gpu".into(),
        operator: "Exists".into(),
        value: None,
        effect: Some("NoSchedule".into()),
    }
}

fn class(
    name: &str,
    accelerator: &str,
    resource: &str,
    per_node: u32,
    price: f64,
    fallbacks: &[&str],
) -> GpuClass {
    GpuClass {
        name: name.into(),
        node_selector: [("accelerator".to_owned(), accelerator.to_owned())].into(),
        tolerations: vec![nvidia_taint()],
        resource_name: resource.into(),
        per_node,
        price_per_hour: price,
        fallbacks: fallbacks.iter().map(|&f| f.to_owned()).collect(),
    }
}

impl Default for GpuClasses {
    /// `v100`, `a100`, `a100-mig-1g.10gb`, `h100`, with list prices of a large cloud;
    /// by memory per GPU: the MIG slice (10 GB), v100 (32 GB), a100 (40 GB), h100 (80 GB).
    fn default() -> Self {
        let classes = Self::new(vec![
            class("v100", "nvidia-tesla-v100", "nvidia.com/gpu", 8, 2.48, &[]),
            class(
                "a100",
                "nvidia-tesla-a100",
                "nvidia.com/gpu",
                8,
                3.67,
                &["h100"],
            ),
            class(
                "a100-mig-1g.10gb",
                "nvidia-tesla-a100",
                "nvidia.com/mig-1g.10gb",
                7,
                0.52,
                &[],
            ),
            class(
                "h100",
                "nvidia-h100-80gb",
                "nvidia.com/gpu",
                8,
                9.80,
                &["a100"],
            ),
        ]);
        classes.with_memory_order(
            ["a100-mig-1g.10gb", "v100", "a100", "h100"]
                .map(str::to_owned)
                .to_vec(),
        )
    }
}

impl GpuClasses {
    #[must_use]
    pub fn new(classes: Vec<GpuClass>) -> Self {
        Self {
            classes: classes.into_iter().map(|c| (c.name.clone(), c)).collect(),
            memory_order: Vec::new(),
        }
    }

    /// These classes, ordered from least to most memory per GPU by `order`.
    #[must_use]
    pub fn with_memory_order(mut self, order: Vec<String>) -> Self {
        self.memory_order = order;
        self
    }

    /// The class a task with `count` GPUs of `current` moves to when it ran out of GPU
    /// memory: the next class after `current` in the memory order whose nodes hold
    /// `count` GPUs. `None` when `current` is not in the order or none follows.
    #[must_use]
    pub fn next_with_more_memory(&self, current: &str, count: u32) -> Option<&GpuClass> {
        let position = self.memory_order.iter().position(|name| name == current)?;
        self.memory_order[position + 1..]
            .iter()
            .filter_map(|name| self.get(name))
            .find(|class| class.per_node >= count)
    }

    #[must_use]
    pub fn get(&self, name: &str) -> Option<&GpuClass> {
        self.classes.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &GpuClass> {
        self.classes.values()
    }

    /// Class name → GPUs per node, what submission validation needs.
    #[must_use]
    pub fn capacities(&self) -> BTreeMap<String, u32> {
        self.classes
            .iter()
            .map(|(name, c)| (name.clone(), c.per_node))
            .collect()
    }

    /// The class a task whose request names `requested`, now placed on `current`, moves
    /// to when `current` cannot place it: the next class after `current` in `requested`'s
    /// fallback list that can hold `count` GPUs on one node. `None` when none is left.
    #[must_use]
    pub fn next_fallback(&self, requested: &str, current: &str, count: u32) -> Option<&GpuClass> {
        let chain: Vec<&str> = std::iter::once(requested)
            .chain(
                self.get(requested)
                    .map(|c| c.fallbacks.iter().map(String::as_str))
                    .into_iter()
                    .flatten(),
            )
            .collect();
        let position = chain.iter().position(|name| *name == current)?;
        chain[position + 1..]
            .iter()
            .filter_map(|name| self.get(name))
            .find(|class| class.per_node >= count)
    }
}

/// Everything the placement file configures, checked. The default is the built-in GPU
/// classes and no shared claims.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PlacementCatalog {
    pub gpu_classes: GpuClasses,
    pub volume_claims: BTreeMap<String, SharedClaim>,
}

/// Extended resource names: `domain/name`, the shape Kubernetes accepts for device
/// plugins.
fn is_extended_resource(name: &str) -> bool {
    name.split_once('/').is_some_and(|(domain, resource)| {
        !domain.is_empty()
            && domain.contains('.')
            && !resource.is_empty()
            && resource.len() <= 63
            && resource
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    })
}

/// The largest placement file read (real ones are a few KiB).
const MAX_FILE_BYTES: usize = 1024 * 1024;

impl PlacementCatalog {
    /// Reads and checks the placement file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, PlacementError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlacementError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and checks a placement file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, PlacementError> {
        // YAML 1.2 booleans only (`yes` is not true), duplicate keys refused (saphyr's
        // default), its budget (depth, nodes, aliases); errors name the line and column.
        let syntax = |message: String| PlacementError::Syntax {
            path: path.to_owned(),
            message,
        };
        if text.len() > MAX_FILE_BYTES {
            return Err(syntax(format!("larger than {MAX_FILE_BYTES} bytes")));
        }
        let options = serde_saphyr::options! { strict_booleans: true, with_snippet: false };
        let file: PlacementFile = serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| syntax(e.to_string()))?;
        Self::from_file(file, path)
    }

    /// Checks a parsed placement file.
    pub fn from_file(file: PlacementFile, path: &str) -> Result<Self, PlacementError> {
        let rule = |field: String, message: &str| PlacementError::Rule {
            path: path.to_owned(),
            field,
            message: message.to_owned(),
        };
        if file.gpu_classes.is_empty() {
            return Err(rule(
                "gpu_classes".into(),
                "must list at least one class (GPU tasks could never run)",
            ));
        }
        let names: BTreeSet<&str> = file.gpu_classes.iter().map(|c| c.name.as_str()).collect();
        let mut seen = BTreeSet::new();
        for (index, class) in file.gpu_classes.iter().enumerate() {
            let field = |name: &str| format!("gpu_classes[{index}].{name}");
            if !crate::k8s::names::is_class_name(&class.name) {
                return Err(rule(
                    field("name"),
                    "must be 1 to 63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit",
                ));
            }
            if !seen.insert(class.name.as_str()) {
                return Err(rule(field("name"), "is used by an earlier class"));
            }
            if !is_extended_resource(&class.resource_name) {
                return Err(rule(
                    field("resource_name"),
                    "must be an extended resource such as nvidia.com/gpu or nvidia.com/mig-1g.10gb",
                ));
            }
            if class.per_node == 0 {
                return Err(rule(field("per_node"), "must be at least 1"));
            }
            if !(class.price_per_hour.is_finite() && class.price_per_hour >= 0.0) {
                return Err(rule(
                    field("price_per_hour"),
                    "must be a number of dollars, 0 or more",
                ));
            }
            for (t, toleration) in class.tolerations.iter().enumerate() {
                if !matches!(toleration.operator.as_str(), "Exists" | "Equal") {
                    return Err(rule(
                        field(&format!("tolerations[{t}].operator")),
                        "must be Exists or Equal",
                    ));
                }
                if let Some(effect) = &toleration.effect
                    && !matches!(
                        effect.as_str(),
                        "NoSchedule" | "PreferNoSchedule" | "NoExecute"
                    )
                {
                    return Err(rule(
                        field(&format!("tolerations[{t}].effect")),
                        "must be NoSchedule, PreferNoSchedule or NoExecute",
                    ));
                }
            }
            for (f, fallback) in class.fallbacks.iter().enumerate() {
                if fallback == &class.name {
                    return Err(rule(
                        field(&format!("fallbacks[{f}]")),
                        "a class cannot fall back to itself",
                    ));
                }
                if !names.contains(fallback.as_str()) {
                    return Err(rule(
                        field(&format!("fallbacks[{f}]")),
                        &format!("names '{fallback}', which is not a configured class"),
                    ));
                }
            }
        }
        let mut ordered = BTreeSet::new();
        for (index, name) in file.gpu_memory_order.iter().enumerate() {
            let field = format!("gpu_memory_order[{index}]");
            if !names.contains(name.as_str()) {
                return Err(rule(
                    field,
                    &format!("names '{name}', which is not a configured class"),
                ));
            }
            if !ordered.insert(name.as_str()) {
                return Err(rule(field, "lists a class a second time"));
            }
        }
        let mut volume_claims = BTreeMap::new();
        for (index, claim) in file.volume_claims.into_iter().enumerate() {
            let field = |name: &str| format!("volume_claims[{index}].{name}");
            if !crate::k8s::names::is_class_name(&claim.name) {
                return Err(rule(
                    field("name"),
                    "must be a Kubernetes object name (lowercase letters, digits, '-', '.')",
                ));
            }
            if claim.tenants.is_empty() {
                return Err(rule(
                    field("tenants"),
                    "must list at least one tenant, or '*' for every tenant",
                ));
            }
            if volume_claims.contains_key(&claim.name) {
                return Err(rule(field("name"), "is used by an earlier claim"));
            }
            volume_claims.insert(claim.name.clone(), claim);
        }
        Ok(Self {
            gpu_classes: GpuClasses::new(file.gpu_classes).with_memory_order(file.gpu_memory_order),
            volume_claims,
        })
    }
}

#[cfg(test)]
mod tests {
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
}
