//! Every Prometheus metric of the dispatcher, defined here and nowhere else, served at
//! `GET /metrics` (OpenMetrics text). One submodule per concern registers its families
//! and offers the typed recording methods callers use:
//! [`http`] (`metrics.http()`), [`tasks`] (`metrics.tasks()`), [`queue`]
//! (`metrics.queue_operation`), [`kubernetes`] (`metrics.kubernetes()` and the client
//! layer), [`store`] (`metrics.store_query`), [`errors`] (`metrics.error`), [`reports`]
//! (`metrics.reports()`), [`cost`] (`metrics.cost`), [`webhooks`] (`metrics.webhooks()`), [`gauges`] with [`snapshot`] (the
//! state read from the store at scrape time) and [`process`] (the standard `process_*`
//! families, unprefixed, read at each scrape).
//!
//! Invariants:
//! - names carry their unit (`_seconds`, `_bytes`, `_dollars`, `_ratio`) and counters end
//!   in `_total`; every family has help text; `docs/OBSERVABILITY.md` lists exactly these
//!   families (a test compares the two);
//! - labels are bounded: never a task id, a Job name or free text; closed sets are enums
//!   ([`labels`]); values that clients or runners choose (tenant, queue, model) pass
//!   through [`Metrics::bounded`], which keeps at most [`MAX_LABEL_VALUES`] distinct values
//!   per label and folds the rest into `other`;
//! - counters count events this process saw (sum them over replicas); the gauges under
//!   "state" are read from the store at scrape time ([`snapshot`]) and are the same on
//!   every replica (take `max` over replicas).

pub mod cost;
pub mod errors;
pub mod gauges;
pub mod http;
pub mod kubernetes;
pub mod labels;
pub mod process;
pub mod queue;
pub mod registry;
pub mod reports;
pub mod snapshot;
pub mod store;
mod store_operations;
pub mod tasks;
#[cfg(test)]
mod tests;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use self::cost::CostResource;
pub use self::errors::ErrorComponent;
pub use self::http::{HttpMetrics, ReadinessResult};
pub use self::kubernetes::{JobDeletion, KubernetesMetrics, KubernetesVerb, WatchedObject};
pub use self::labels::{MAX_LABEL_VALUES, OTHER};
pub use self::queue::QueueOperation;
pub use self::registry::{
    Described, Kind, LATENCY_BUCKETS, STAGE_BUCKETS, family_names, reference_table,
};
pub use self::reports::{ReportKind, ReportMetrics};
pub use self::store::PoolState;
pub use self::tasks::{LaunchFailure, LaunchInFlight, Stage, TaskMetrics};
pub use self::webhooks::{DeliveryResult, WebhookMetrics};

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The dispatcher's metrics. Cheap to clone: clones share the families.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

/// The registry and each concern's families, in registration order.
struct Inner {
    registry: Registry,
    described: Vec<Described>,
    http: http::HttpFamilies,
    tasks: tasks::TaskFamilies,
    queue: queue::QueueFamilies,
    kubernetes: kubernetes::KubernetesFamilies,
    store: store::StoreFamilies,
    errors: errors::ErrorFamilies,
    reports: reports::ReportFamilies,
    cost: cost::CostFamilies,
    webhooks: webhooks::WebhookFamilies,
    gauges: gauges::StateGauges,
    bounded: labels::BoundedValues,
    snapshot: tokio::sync::Mutex<Option<Instant>>,
    /// When this registry was made: a snapshot that never succeeded is this old.
    created: Instant,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new("local")
    }
}

impl Metrics {
    /// A fresh registry with every family, `build_info` set for `executor`. The order of
    /// registration is the order of the exposition and of the documentation's table.
    #[must_use]
    pub fn new(executor: &str) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(process::ProcessCollector));
        let mut registrar = registry::Registrar::new(&mut registry);
        let http = http::HttpFamilies::register(&mut registrar);
        let tasks = tasks::TaskFamilies::register(&mut registrar);
        let queue = queue::QueueFamilies::register(&mut registrar);
        let kubernetes = kubernetes::KubernetesFamilies::register(&mut registrar);
        let store = store::StoreFamilies::register(&mut registrar);
        let errors = errors::ErrorFamilies::register(&mut registrar);
        let reports = reports::ReportFamilies::register(&mut registrar);
        let cost = cost::CostFamilies::register(&mut registrar);
        let webhooks = webhooks::WebhookFamilies::register(&mut registrar);
        let gauges = gauges::StateGauges::register(&mut registrar);
        process::register(&mut registrar, executor);
        let described = registrar.into_described();
        Self {
            inner: Arc::new(Inner {
                registry,
                described,
                http,
                tasks,
                queue,
                kubernetes,
                store,
                errors,
                reports,
                cost,
                webhooks,
                gauges,
                bounded: labels::BoundedValues::default(),
                snapshot: tokio::sync::Mutex::new(None),
                created: Instant::now(),
            }),
        }
    }

    /// Every family, in registration order (the metrics reference of the docs).
    #[must_use]
    pub fn described(&self) -> &[Described] {
        &self.inner.described
    }

    /// Records HTTP requests.
    #[must_use]
    pub fn http(&self) -> HttpMetrics<'_> {
        HttpMetrics { metrics: self }
    }

    /// Records the task lifecycle.
    #[must_use]
    pub fn tasks(&self) -> TaskMetrics<'_> {
        TaskMetrics { metrics: self }
    }

    /// Records Kubernetes API requests and watch events.
    #[must_use]
    pub fn kubernetes(&self) -> KubernetesMetrics<'_> {
        KubernetesMetrics { metrics: self }
    }

    /// Records runner reports and their LLM usage.
    #[must_use]
    pub fn reports(&self) -> ReportMetrics<'_> {
        ReportMetrics { metrics: self }
    }

    /// Records webhook delivery attempts.
    #[must_use]
    pub fn webhooks(&self) -> WebhookMetrics<'_> {
        WebhookMetrics { metrics: self }
    }

    /// `value` itself while `label` has seen fewer than [`MAX_LABEL_VALUES`] distinct
    /// values, else [`OTHER`].
    #[must_use]
    pub fn bounded(&self, label: &'static str, value: &str) -> String {
        self.inner.bounded.admit(label, value)
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)?;
        Ok(text)
    }

    /// Runs `refresh` unless the snapshot is younger than `max_age`; concurrent scrapes
    /// wait for one refresh instead of each querying the store.
    pub async fn refresh_snapshot<F, Fut>(&self, max_age: Duration, refresh: F)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let snapshot_age = &self.inner.gauges.snapshot_age;
        let mut taken = self.inner.snapshot.lock().await;
        if let Some(at) = *taken
            && at.elapsed() < max_age
        {
            snapshot_age.set(at.elapsed().as_secs_f64());
            return;
        }
        if refresh().await {
            *taken = Some(Instant::now());
            snapshot_age.set(0.0);
        } else {
            let since = taken.unwrap_or(self.inner.created);
            snapshot_age.set(since.elapsed().as_secs_f64());
        }
    }
}
