//! GPU classes: how a class name in a submission (`a100`) becomes a place in the
//! cluster (node selector, tolerations, the extended resource to request) and a price.
//! The idea is Kueue's ResourceFlavor.
//!
//! Invariants: class names are unique; every class requests exactly one extended resource;
//! the shipped defaults match the node pools of the test environment (`tests/env`) and the
//! labels and taints of the NVIDIA GPU operator.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A toleration, in the shape Kubernetes uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
pub struct GpuClass {
    pub name: String,
    pub node_selector: BTreeMap<String, String>,
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

/// The configured GPU classes, by name.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuClasses {
    classes: BTreeMap<String, GpuClass>,
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
    /// `v100`, `a100`, `a100-mig-1g.10gb`, `h100`, with list prices of a large cloud.
    fn default() -> Self {
        Self::new(vec![
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
        ])
    }
}

impl GpuClasses {
    #[must_use]
    pub fn new(classes: Vec<GpuClass>) -> Self {
        Self {
            classes: classes.into_iter().map(|c| (c.name.clone(), c)).collect(),
        }
    }

    #[must_use]
    pub fn get(&self, name: &str) -> Option<&GpuClass> {
        self.classes.get(name)
    }

    /// Class name → GPUs per node, what submission validation needs.
    #[must_use]
    pub fn capacities(&self) -> BTreeMap<String, u32> {
        self.classes
            .iter()
            .map(|(name, c)| (name.clone(), c.per_node))
            .collect()
    }
}
