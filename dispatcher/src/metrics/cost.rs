//! Dollars spent, counted as they are known: compute (GPU, CPU, memory) when a task ends,
//! LLM usage as runners report it. The state of spending (rates, spend against budgets)
//! is in the state gauges.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;

use super::labels::label_values;
use super::registry::Registrar;
use super::{FloatCounter, Metrics};
use crate::cost::Breakdown;

label_values! {
    /// What the dollars paid for.
    pub enum CostResource {
        Gpu => "gpu",
        Cpu => "cpu",
        Memory => "memory",
        Llm => "llm",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    tenant: String,
    queue: String,
    resource: CostResource,
}

#[derive(Debug)]
pub(super) struct CostFamilies {
    dollars: Family<CostLabels, FloatCounter>,
}

impl CostFamilies {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let families = Self {
            dollars: Family::default(),
        };
        registrar.counter(
            "cost_dollars",
            &["tenant", "queue", "resource"],
            "Dollars spent, by tenant, queue and resource (gpu, cpu, memory: at a task's end; llm: as reported)",
            families.dollars.clone(),
        );
        families
    }
}

impl Metrics {
    /// Adds `dollars` of `resource` to a tenant's spend (nothing unless positive and
    /// finite).
    pub fn cost(&self, tenant: &str, queue: &str, resource: CostResource, dollars: f64) {
        if dollars > 0.0 && dollars.is_finite() {
            self.inner
                .cost
                .dollars
                .get_or_create(&CostLabels {
                    tenant: self.bounded("tenant", tenant),
                    queue: self.bounded("queue", queue),
                    resource,
                })
                .inc_by(dollars);
        }
    }

    /// Adds the compute cost of a finished task, per resource.
    pub fn compute_cost(&self, tenant: &str, queue: &str, compute: &Breakdown) {
        for (resource, dollars) in [
            (CostResource::Gpu, compute.gpu),
            (CostResource::Cpu, compute.cpu),
            (CostResource::Memory, compute.memory),
        ] {
            self.cost(tenant, queue, resource, dollars);
        }
    }
}
