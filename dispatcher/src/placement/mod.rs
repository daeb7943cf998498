//! Placement: where a task may run and what its pod needs to run well there.
//!
//! - GPU classes (Kueue's ResourceFlavor idea): a class name in a submission (`a100`)
//!   becomes a node selector, tolerations, the extended resource to request, a price, and
//!   an ordered list of fallback classes. Operators describe them in the placement file
//!   (`--placement-file`, YAML); [`PlacementCatalog::default`] is the shipped default,
//!   identical to `dispatcher/config/placement.yaml`.
//!   A class may also give the CPU and memory of a task that asks for none
//!   ([`ClassDefaults`]) and the Pod Security level its pods are built for
//!   ([`ClassSecurity`]: `restricted` unless the operator says `baseline`).
//! - Shared volume claims: which existing PersistentVolumeClaims (models, datasets) which
//!   tenants may mount, and whether they may ever mount them writable.
//! - Workload kinds (`ml`, `cv`, `cpu`) are the task's own ([`crate::task::workload`]).
//!
//! Invariants: class and claim names are unique; every class requests exactly one
//! extended resource and can hold at least one GPU per node; every fallback names another
//! configured class; class defaults are Kubernetes quantities above zero; a class runs
//! as root only under the `baseline` profile; the shipped defaults match the node pools of the test environment
//! (`tests/env`) and the labels and taints of the NVIDIA GPU operator. A file that breaks
//! a rule is refused at start with an error naming the entry and the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::k8s::quantity::{Cpu, Memory};

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
    /// CPU and memory of a task of this class that asks for none.
    #[serde(default, skip_serializing_if = "ClassDefaults::is_empty")]
    pub defaults: ClassDefaults,
    /// The Pod Security level the class's pods are built for, and their user.
    #[serde(default, skip_serializing_if = "ClassSecurity::is_default")]
    pub security: ClassSecurity,
}

/// The CPU and memory a task of a class gets when its submission names none, as written
/// (Kubernetes quantities, `4000m`, `8Gi`); checked when the file is loaded, so a loaded
/// class's [`GpuClass::default_cpu`] and [`GpuClass::default_memory`] are its values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassDefaults {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity_text"
    )]
    pub cpu: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "quantity_text"
    )]
    pub memory: Option<String>,
}

/// A quantity as text, written as a string or a bare YAML number (`cpu: 4`).
fn quantity_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Whole(u64),
        Fraction(f64),
    }
    Ok(
        Option::<Written>::deserialize(deserializer)?.map(|written| match written {
            Written::Text(text) => text,
            Written::Whole(n) => n.to_string(),
            Written::Fraction(x) => x.to_string(),
        }),
    )
}

impl ClassDefaults {
    fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.memory.is_none()
    }
}

/// A Pod Security Standard level a class's pods meet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurityLevel {
    /// Non-root, all capabilities dropped, no privilege escalation, RuntimeDefault seccomp.
    #[default]
    Restricted,
    /// May run as root with the runtime's default capabilities (still no privileges, host
    /// namespaces or host paths): for images that install packages or write as root. The
    /// tasks namespace must enforce `baseline` then (docs/SECURITY.md).
    Baseline,
}

impl PodSecurityLevel {
    /// The level as Pod Security admission's labels spell it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restricted => "restricted",
            Self::Baseline => "baseline",
        }
    }
}

/// How a class's task pods are secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSecurity {
    #[serde(default)]
    pub profile: PodSecurityLevel,
    /// User and group id of the task; `None`: the launcher's `--run-as-user`. 0 (root)
    /// only with `profile: baseline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<i64>,
}

impl ClassSecurity {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl GpuClass {
    /// The CPU a task of this class asks for when it names none.
    #[must_use]
    pub fn default_cpu(&self) -> Option<Cpu> {
        self.defaults
            .cpu
            .as_deref()
            .and_then(|text| text.parse().ok())
    }

    /// The memory a task of this class asks for when it names none.
    #[must_use]
    pub fn default_memory(&self) -> Option<Memory> {
        self.defaults
            .memory
            .as_deref()
            .and_then(|text| text.parse().ok())
    }
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
        defaults: ClassDefaults {
            cpu: Some(GPU_DEFAULT_CPU.to_owned()),
            memory: Some(GPU_DEFAULT_MEMORY.to_owned()),
        },
        security: ClassSecurity::default(),
    }
}

/// The CPU of a task on a built-in GPU class that names none: enough cores to feed one
/// GPU's data loader.
pub const GPU_DEFAULT_CPU: &str = "4000m";
/// The memory of a task on a built-in GPU class that names none (its `/dev/shm` comes on
/// top, see [`crate::launcher::job_spec`]).
pub const GPU_DEFAULT_MEMORY: &str = "8Gi";

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

    /// What a task asks for on `class` (`None` for a CPU task): its own CPU and memory,
    /// else the class's defaults. The launcher, the cost model and memory-growing retries
    /// all use this, so they agree on what the pod requests.
    #[must_use]
    pub fn effective_requests(
        &self,
        class: Option<&str>,
        cpu: Option<Cpu>,
        memory: Option<Memory>,
    ) -> (Option<Cpu>, Option<Memory>) {
        let class = class.and_then(|name| self.get(name));
        (
            cpu.or_else(|| class.and_then(GpuClass::default_cpu)),
            memory.or_else(|| class.and_then(GpuClass::default_memory)),
        )
    }

    pub fn iter(&self) -> impl Iterator<Item = &GpuClass> {
        self.classes.values()
    }

    /// The least strict Pod Security level any class's pods need: what the tasks
    /// namespace must enforce (`baseline` as soon as one class is `baseline`).
    #[must_use]
    pub fn namespace_level(&self) -> PodSecurityLevel {
        if self
            .iter()
            .any(|class| class.security.profile == PodSecurityLevel::Baseline)
        {
            PodSecurityLevel::Baseline
        } else {
            PodSecurityLevel::Restricted
        }
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

mod load;
#[cfg(test)]
mod tests;
