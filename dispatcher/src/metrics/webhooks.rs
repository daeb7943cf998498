//! Webhook deliveries: attempts by what came of them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::Metrics;
use super::labels::label_values;
use super::registry::Registrar;

label_values! {
    /// What one delivery attempt came to.
    pub enum DeliveryResult {
        /// A 2xx answer.
        Delivered => "delivered",
        /// Another answer or a transport error; it is tried again later.
        Retried => "retried",
        /// It failed and its retry period is over: never tried again.
        GivenUp => "given_up",
        /// Its destination is refused (scheme, host or address): never tried again.
        Refused => "refused",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: DeliveryResult,
}

#[derive(Debug)]
pub(super) struct WebhookFamilies {
    attempts: Family<ResultLabels, Counter>,
}

impl WebhookFamilies {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let families = Self {
            attempts: Family::default(),
        };
        registrar.counter(
            "webhook_deliveries",
            &["result"],
            "Webhook delivery attempts, by result (delivered, retried, given_up, refused)",
            families.attempts.clone(),
        );
        families
    }
}

/// Records webhook delivery attempts.
#[derive(Debug, Clone, Copy)]
pub struct WebhookMetrics<'a> {
    pub(super) metrics: &'a Metrics,
}

impl WebhookMetrics<'_> {
    /// One attempt, and what came of it.
    pub fn attempt(&self, result: DeliveryResult) {
        self.metrics
            .inner
            .webhooks
            .attempts
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}
