//! Store (database) operations: how many, whether the database failed them, how long
//! they took, and the connection pool. A failed operation is also an error of component
//! `store`.
//!
//! Operations are named by the store method that ran them (`transition`, `insert_task`,
//! ...): fixed words chosen in the code, so bounded by it.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::Metrics;
use super::errors::ErrorComponent;
use super::labels::{Outcome, label_values};
use super::registry::{Registrar, latency_histogram};

label_values! {
    /// What the database pool's connections are doing.
    pub enum PoolState {
        InUse => "in_use",
        Idle => "idle",
        /// The pool's bound.
        Max => "max",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationOutcomeLabels {
    operation: &'static str,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    state: PoolState,
}

#[derive(Debug)]
pub(super) struct StoreFamilies {
    queries: Family<OperationOutcomeLabels, Counter>,
    query_duration: Family<OperationLabels, Histogram>,
    pool_connections: Family<PoolLabels, Gauge>,
}

impl StoreFamilies {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let families = Self {
            queries: Family::default(),
            query_duration: Family::new_with_constructor(latency_histogram),
            pool_connections: Family::default(),
        };
        registrar.counter(
            "store_queries",
            &["operation", "outcome"],
            "Store operations, by operation and outcome (ok, error)",
            families.queries.clone(),
        );
        registrar.histogram(
            "store_query_duration_seconds",
            &["operation"],
            "Time of a store operation, by operation",
            families.query_duration.clone(),
        );
        registrar.gauge(
            "store_pool_connections",
            &["state"],
            "Database pool connections, by state (idle, in_use, max)",
            families.pool_connections.clone(),
        );
        families
    }
}

impl Metrics {
    /// Records one store operation; `ok` is false only when the database failed it.
    pub fn store_query(&self, operation: &'static str, ok: bool, took: Duration) {
        let families = &self.inner.store;
        families
            .queries
            .get_or_create(&OperationOutcomeLabels {
                operation,
                outcome: Outcome::of(ok),
            })
            .inc();
        families
            .query_duration
            .get_or_create(&OperationLabels { operation })
            .observe(took.as_secs_f64());
        if !ok {
            self.error(ErrorComponent::Store, operation);
        }
    }

    /// Sets the pool's connections in `state`.
    pub fn store_pool_connections(&self, state: PoolState, connections: u32) {
        self.inner
            .store
            .pool_connections
            .get_or_create(&PoolLabels { state })
            .set(i64::from(connections));
    }
}
