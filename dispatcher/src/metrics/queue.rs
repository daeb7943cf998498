//! Queue operations (the Redis streams or the in-process queue): how many, whether they
//! failed, and how long they took. A failed one is also an error of component `queue`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use super::Metrics;
use super::errors::ErrorComponent;
use super::labels::{Outcome, label_values};
use super::registry::{Registrar, latency_histogram};

label_values! {
    /// An operation of the queue.
    pub enum QueueOperation {
        Enqueue => "enqueue",
        /// Includes its blocking wait for work.
        Receive => "receive",
        Ack => "ack",
        Reclaim => "reclaim",
        Pending => "pending",
        ForgetConsumers => "forget_consumers",
        Ping => "ping",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationOutcomeLabels {
    operation: QueueOperation,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: QueueOperation,
}

#[derive(Debug)]
pub(super) struct QueueFamilies {
    operations: Family<OperationOutcomeLabels, Counter>,
    operation_duration: Family<OperationLabels, Histogram>,
}

impl QueueFamilies {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let families = Self {
            operations: Family::default(),
            operation_duration: Family::new_with_constructor(latency_histogram),
        };
        registrar.counter(
            "queue_operations",
            &["operation", "outcome"],
            "Queue operations (enqueue, receive, ack, reclaim, pending, ping), by operation and outcome (ok, error)",
            families.operations.clone(),
        );
        registrar.histogram(
            "queue_operation_duration_seconds",
            &["operation"],
            "Time of a queue operation, by operation (receive includes its blocking wait for work)",
            families.operation_duration.clone(),
        );
        families
    }
}

impl Metrics {
    /// Records one queue operation.
    pub fn queue_operation(&self, operation: QueueOperation, ok: bool, took: Duration) {
        let families = &self.inner.queue;
        families
            .operations
            .get_or_create(&OperationOutcomeLabels {
                operation,
                outcome: Outcome::of(ok),
            })
            .inc();
        families
            .operation_duration
            .get_or_create(&OperationLabels { operation })
            .observe(took.as_secs_f64());
        if !ok {
            self.error(ErrorComponent::Queue, operation.as_str());
        }
    }
}
