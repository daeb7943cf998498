//! Reading and checking the placement file: every rule of [`super`]'s invariants, each
//! broken rule an error naming the entry and the field.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    GpuClass, GpuClasses, PlacementCatalog, PlacementError, PlacementFile, PodSecurityLevel,
};
use crate::k8s::quantity::{Cpu, Memory};

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
            check_class_extras(class, &|name: &str| field(name), &rule)?;
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

/// Checks a class's `defaults` and `security`; `field` names a field of the class.
fn check_class_extras(
    class: &GpuClass,
    field: &dyn Fn(&str) -> String,
    rule: &dyn Fn(String, &str) -> PlacementError,
) -> Result<(), PlacementError> {
    let name = &class.name;
    if let Some(cpu) = &class.defaults.cpu
        && let Err(e) = cpu.parse::<Cpu>()
    {
        return Err(rule(field("defaults.cpu"), &format!("class '{name}': {e}")));
    }
    if let Some(memory) = &class.defaults.memory
        && let Err(e) = memory.parse::<Memory>()
    {
        return Err(rule(
            field("defaults.memory"),
            &format!("class '{name}': {e}"),
        ));
    }
    match class.security.run_as_user {
        Some(user) if user < 0 => Err(rule(
            field("security.run_as_user"),
            &format!("class '{name}': must be a user id, 0 or more"),
        )),
        Some(0) if class.security.profile == PodSecurityLevel::Restricted => Err(rule(
            field("security.run_as_user"),
            &format!(
                "class '{name}': 0 (root) is refused by the restricted profile; set security.profile: baseline"
            ),
        )),
        _ => Ok(()),
    }
}
