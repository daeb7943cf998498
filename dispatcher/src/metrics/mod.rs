//! Every Prometheus metric of the dispatcher, defined here and nowhere else, served at
//! `GET /metrics` (OpenMetrics text).
//!
//! Invariants:
//! - names carry their unit (`_seconds`, `_bytes`, `_dollars`, `_ratio`) and counters end
//!   in `_total`; every family has help text; `docs/OBSERVABILITY.md` lists exactly these
//!   families (a test compares the two);
//! - labels are bounded: never a task id, a Job name or free text; values that clients or
//!   runners choose (tenant, queue, model) pass through [`BoundedValues`], which keeps at
//!   most [`MAX_LABEL_VALUES`] distinct values per family and folds the rest into `other`;
//! - counters count events this process saw (sum them over replicas); the gauges under
//!   "state" are read from the store at scrape time ([`snapshot`]) and are the same on
//!   every replica (take `max` over replicas).

pub mod kubernetes;
pub mod snapshot;
mod store_operations;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Distinct values a client-chosen label may take in one family before the rest are
/// counted as `other`.
pub const MAX_LABEL_VALUES: usize = 200;

/// The value a label takes once its family has seen [`MAX_LABEL_VALUES`] others.
pub const OTHER: &str = "other";

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantQueueLabels {
    pub tenant: String,
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaunchLabels {
    pub queue: String,
    pub gpu_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaunchFailureLabels {
    pub queue: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    pub queue: String,
    pub outcome: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationOutcomeLabels {
    pub operation: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub object: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubernetesLabels {
    pub verb: String,
    pub resource: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubernetesLatencyLabels {
    pub verb: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub component: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuClassLabels {
    pub gpu_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub tenant: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub tenant: String,
    pub model: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub tenant: String,
    pub queue: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub tenant: String,
    pub period: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub executor: String,
}

/// The families. Fields are public so that each component records what it sees; the
/// snapshot gauges are written only by [`snapshot`].
#[derive(Debug)]
pub struct Families {
    // HTTP
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_duration: Family<RouteLabels, Histogram>,
    // Tasks
    pub tasks_submitted: Family<TenantQueueLabels, Counter>,
    pub idempotency_key_hits: Family<TenantLabels, Counter>,
    pub budget_refusals: Family<BudgetLabels, Counter>,
    pub tasks_launched: Family<LaunchLabels, Counter>,
    pub launch_failures: Family<LaunchFailureLabels, Counter>,
    pub tasks_finished: Family<FinishedLabels, Counter>,
    pub task_stage_duration: Family<StageLabels, Histogram>,
    pub launches_in_flight: Gauge,
    // Queue
    pub queue_operations: Family<OperationOutcomeLabels, Counter>,
    pub queue_operation_duration: Family<OperationLabels, Histogram>,
    // Kubernetes
    pub kubernetes_requests: Family<KubernetesLabels, Counter>,
    pub kubernetes_request_duration: Family<KubernetesLatencyLabels, Histogram>,
    pub kubernetes_watch_events: Family<ObjectLabels, Counter>,
    // Store
    pub store_queries: Family<OperationOutcomeLabels, Counter>,
    pub store_query_duration: Family<OperationLabels, Histogram>,
    pub store_pool_connections: Family<PoolLabels, Gauge>,
    // Errors
    pub errors: Family<ErrorLabels, Counter>,
    // Runner reports
    pub runner_reports: Family<KindLabels, Counter>,
    pub llm_calls: Family<ModelLabels, Counter>,
    pub llm_tokens: Family<TokenLabels, Counter>,
    // Cost
    pub cost: Family<CostLabels, FloatCounter>,
    // State read from the store at scrape time
    pub tasks: Family<StateLabels, Gauge>,
    pub queue_depth: Family<QueueLabels, Gauge>,
    pub queue_oldest_age: Family<QueueLabels, FloatGauge>,
    pub stuck_tasks: Family<ReasonLabels, Gauge>,
    pub gpus_allocated: Family<GpuClassLabels, Gauge>,
    pub gpus_reporting: Family<GpuClassLabels, Gauge>,
    pub gpu_utilization: Family<GpuClassLabels, FloatGauge>,
    pub gpu_memory_used: Family<GpuClassLabels, FloatGauge>,
    pub cost_rate: Family<TenantQueueLabels, FloatGauge>,
    pub tenant_spend: Family<BudgetLabels, FloatGauge>,
    pub tenant_budget: Family<BudgetLabels, FloatGauge>,
    pub cost_rate_alert_threshold: FloatGauge,
    pub snapshot_age: FloatGauge,
    // Process
    pub process_resident_memory: Gauge,
    pub process_open_fds: Gauge,
    pub build_info: Family<BuildLabels, Gauge>,
}

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One family as scrapers see it: full name (counters with `_total`), kind, help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub name: String,
    pub kind: Kind,
    /// Label names (histograms also have `le`).
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

/// Registers `$metric` as `agent_bus_$name` and describes it.
macro_rules! register {
    ($registry:ident, $described:ident, $name:literal, $kind:expr, $labels:expr, $help:literal, $metric:expr) => {{
        $registry.register($name, $help, $metric);
        let kind: Kind = $kind;
        $described.push(Described {
            name: if kind == Kind::Counter {
                concat!("agent_bus_", $name, "_total").to_owned()
            } else {
                concat!("agent_bus_", $name).to_owned()
            },
            kind,
            labels: $labels,
            help: $help,
        });
    }};
}

/// The dispatcher's metrics. Cheap to clone: clones share the families.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    described: Vec<Described>,
    families: Families,
    bounded: BoundedValues,
    snapshot: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// When this registry was made: a snapshot that never succeeded is this old.
    created: std::time::Instant,
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

/// Request latencies, 1 ms to 30 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Task stages, 100 ms to a day: a stage can be a scheduling wait or a whole training run.
/// 30 s is a bucket bound because the dispatch-latency objective is "launched within 30 s".
pub const STAGE_BUCKETS: [f64; 18] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
    14400.0, 43200.0, 86400.0,
];

fn latency_buckets() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn stage_buckets() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

impl Metrics {
    /// A fresh registry with every family, `build_info` set for `executor`.
    #[must_use]
    pub fn new(executor: &str) -> Self {
        let families = Families {
            http_requests: Family::default(),
            http_request_duration: Family::new_with_constructor(latency_buckets),
            tasks_submitted: Family::default(),
            idempotency_key_hits: Family::default(),
            budget_refusals: Family::default(),
            tasks_launched: Family::default(),
            launch_failures: Family::default(),
            tasks_finished: Family::default(),
            task_stage_duration: Family::new_with_constructor(stage_buckets),
            launches_in_flight: Gauge::default(),
            queue_operations: Family::default(),
            queue_operation_duration: Family::new_with_constructor(latency_buckets),
            kubernetes_requests: Family::default(),
            kubernetes_request_duration: Family::new_with_constructor(latency_buckets),
            kubernetes_watch_events: Family::default(),
            store_queries: Family::default(),
            store_query_duration: Family::new_with_constructor(latency_buckets),
            store_pool_connections: Family::default(),
            errors: Family::default(),
            runner_reports: Family::default(),
            llm_calls: Family::default(),
            llm_tokens: Family::default(),
            cost: Family::default(),
            tasks: Family::default(),
            queue_depth: Family::default(),
            queue_oldest_age: Family::default(),
            stuck_tasks: Family::default(),
            gpus_allocated: Family::default(),
            gpus_reporting: Family::default(),
            gpu_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            cost_rate: Family::default(),
            tenant_spend: Family::default(),
            tenant_budget: Family::default(),
            cost_rate_alert_threshold: FloatGauge::default(),
            snapshot_age: FloatGauge::default(),
            process_resident_memory: Gauge::default(),
            process_open_fds: Gauge::default(),
            build_info: Family::default(),
        };
        let mut registry = Registry::default();
        let mut described = Vec::new();
        let r = registry.sub_registry_with_prefix("agent_bus");
        let f = &families;
        // Counters get `_total` from the encoder.
        register!(
            r,
            described,
            "http_requests",
            Kind::Counter,
            &["method", "route", "status"],
            "HTTP requests answered, by method, route template and status code",
            f.http_requests.clone()
        );
        register!(
            r,
            described,
            "http_request_duration_seconds",
            Kind::Histogram,
            &["method", "route"],
            "Time to answer an HTTP request, by method and route template",
            f.http_request_duration.clone()
        );
        register!(
            r,
            described,
            "tasks_submitted",
            Kind::Counter,
            &["tenant", "queue"],
            "Tasks accepted by POST /v1/tasks (idempotent replays excluded), by tenant and queue",
            f.tasks_submitted.clone()
        );
        register!(
            r,
            described,
            "idempotency_key_hits",
            Kind::Counter,
            &["tenant"],
            "Submissions answered with an existing task because their idempotency key was known",
            f.idempotency_key_hits.clone()
        );
        register!(
            r,
            described,
            "budget_refusals",
            Kind::Counter,
            &["tenant", "period"],
            "Submissions refused with 402 because a tenant budget was spent, by tenant and period",
            f.budget_refusals.clone()
        );
        register!(
            r,
            described,
            "tasks_launched",
            Kind::Counter,
            &["queue", "gpu_class"],
            "Tasks whose Job (or process) was created, by queue and GPU class (`none` without GPUs)",
            f.tasks_launched.clone()
        );
        register!(
            r,
            described,
            "launch_failures",
            Kind::Counter,
            &["queue", "kind"],
            "Launch attempts that failed, by queue and kind (`transient`: retried, `permanent`: task failed)",
            f.launch_failures.clone()
        );
        register!(
            r,
            described,
            "tasks_finished",
            Kind::Counter,
            &["queue", "outcome", "reason"],
            "Tasks that reached a final state, by queue, outcome (the final state) and reason (`none` if unset)",
            f.tasks_finished.clone()
        );
        register!(
            r,
            described,
            "task_stage_duration_seconds",
            Kind::Histogram,
            &["stage", "queue"],
            "Time tasks spent in each stage: queued_to_launched, launched_to_running, running_to_finished",
            f.task_stage_duration.clone()
        );
        register!(
            r,
            described,
            "launches_in_flight",
            Kind::Gauge,
            &[],
            "Launches this process has started and not finished",
            f.launches_in_flight.clone()
        );
        register!(
            r,
            described,
            "queue_operations",
            Kind::Counter,
            &["operation", "outcome"],
            "Queue operations (enqueue, receive, ack, reclaim, pending, ping), by operation and outcome (ok, error)",
            f.queue_operations.clone()
        );
        register!(
            r,
            described,
            "queue_operation_duration_seconds",
            Kind::Histogram,
            &["operation"],
            "Time of a queue operation, by operation (receive includes its blocking wait for work)",
            f.queue_operation_duration.clone()
        );
        register!(
            r,
            described,
            "kubernetes_requests",
            Kind::Counter,
            &["verb", "resource", "code"],
            "Kubernetes API requests, by verb, resource and HTTP status code (`error` without one)",
            f.kubernetes_requests.clone()
        );
        register!(
            r,
            described,
            "kubernetes_request_duration_seconds",
            Kind::Histogram,
            &["verb", "resource"],
            "Time of a Kubernetes API request, by verb and resource",
            f.kubernetes_request_duration.clone()
        );
        register!(
            r,
            described,
            "kubernetes_watch_events",
            Kind::Counter,
            &["object"],
            "Events received from the Kubernetes watches, by object (job, pod)",
            f.kubernetes_watch_events.clone()
        );
        register!(
            r,
            described,
            "store_queries",
            Kind::Counter,
            &["operation", "outcome"],
            "Store operations, by operation and outcome (ok, error)",
            f.store_queries.clone()
        );
        register!(
            r,
            described,
            "store_query_duration_seconds",
            Kind::Histogram,
            &["operation"],
            "Time of a store operation, by operation",
            f.store_query_duration.clone()
        );
        register!(
            r,
            described,
            "store_pool_connections",
            Kind::Gauge,
            &["state"],
            "Database pool connections, by state (idle, in_use, max)",
            f.store_pool_connections.clone()
        );
        register!(
            r,
            described,
            "errors",
            Kind::Counter,
            &["component", "kind"],
            "Errors, by component (api, store, queue, kubernetes, launcher, watcher, runner_reports) and kind",
            f.errors.clone()
        );
        register!(
            r,
            described,
            "runner_reports",
            Kind::Counter,
            &["kind"],
            "Runner reports stored (duplicates and heartbeats excluded), by kind (started, progress, usage, finished)",
            f.runner_reports.clone()
        );
        register!(
            r,
            described,
            "llm_calls",
            Kind::Counter,
            &["tenant", "model"],
            "LLM calls reported by runners, by tenant and model",
            f.llm_calls.clone()
        );
        register!(
            r,
            described,
            "llm_tokens",
            Kind::Counter,
            &["tenant", "model", "direction"],
            "LLM tokens reported by runners, by tenant, model and direction (input, output)",
            f.llm_tokens.clone()
        );
        register!(
            r,
            described,
            "cost_dollars",
            Kind::Counter,
            &["tenant", "queue", "resource"],
            "Dollars spent, by tenant, queue and resource (gpu, cpu, memory: at a task's end; llm: as reported)",
            f.cost.clone()
        );
        register!(
            r,
            described,
            "tasks",
            Kind::Gauge,
            &["state"],
            "Tasks in the store, by state (read from the store at scrape time)",
            f.tasks.clone()
        );
        register!(
            r,
            described,
            "queue_depth",
            Kind::Gauge,
            &["queue"],
            "Queued tasks, by queue (from the store)",
            f.queue_depth.clone()
        );
        register!(
            r,
            described,
            "queue_oldest_age_seconds",
            Kind::Gauge,
            &["queue"],
            "Age of the longest-waiting queued task, by queue (from the store; absent for an empty queue)",
            f.queue_oldest_age.clone()
        );
        register!(
            r,
            described,
            "stuck_tasks",
            Kind::Gauge,
            &["reason"],
            "Tasks not progressing, by reason: queued_too_long, launching_stale, unschedulable, heartbeat_lost",
            f.stuck_tasks.clone()
        );
        register!(
            r,
            described,
            "gpus_allocated",
            Kind::Gauge,
            &["gpu_class"],
            "GPUs held by launched and running tasks, by GPU class",
            f.gpus_allocated.clone()
        );
        register!(
            r,
            described,
            "gpus_reporting",
            Kind::Gauge,
            &["gpu_class"],
            "GPUs whose runner reported a sample in the last heartbeat, by GPU class",
            f.gpus_reporting.clone()
        );
        register!(
            r,
            described,
            "gpu_utilization_ratio",
            Kind::Gauge,
            &["gpu_class"],
            "Mean utilisation (0-1) of the GPUs in gpus_reporting, by GPU class",
            f.gpu_utilization.clone()
        );
        register!(
            r,
            described,
            "gpu_memory_used_bytes",
            Kind::Gauge,
            &["gpu_class"],
            "GPU memory in use on the GPUs in gpus_reporting, by GPU class",
            f.gpu_memory_used.clone()
        );
        register!(
            r,
            described,
            "cost_rate_dollars_per_hour",
            Kind::Gauge,
            &["tenant", "queue"],
            "What the running tasks cost per hour (GPU, CPU and memory prices), by tenant and queue",
            f.cost_rate.clone()
        );
        register!(
            r,
            described,
            "tenant_spend_dollars",
            Kind::Gauge,
            &["tenant", "period"],
            "A tenant's spend in the current UTC day or month, by tenant and period (day, month)",
            f.tenant_spend.clone()
        );
        register!(
            r,
            described,
            "tenant_budget_dollars",
            Kind::Gauge,
            &["tenant", "period"],
            "A tenant's configured budget, by tenant and period (day, month); absent without one",
            f.tenant_budget.clone()
        );
        register!(
            r,
            described,
            "cost_rate_alert_threshold_dollars_per_hour",
            Kind::Gauge,
            &[],
            "The configured cost rate above which AgentBusHighCostRate fires (--cost-rate-alert-dollars-per-hour)",
            f.cost_rate_alert_threshold.clone()
        );
        register!(
            r,
            described,
            "store_snapshot_age_seconds",
            Kind::Gauge,
            &[],
            "Age of the store snapshot behind the state gauges",
            f.snapshot_age.clone()
        );
        register!(
            r,
            described,
            "process_resident_memory_bytes",
            Kind::Gauge,
            &[],
            "Resident memory of this process",
            f.process_resident_memory.clone()
        );
        register!(
            r,
            described,
            "process_open_fds",
            Kind::Gauge,
            &[],
            "Open file descriptors of this process",
            f.process_open_fds.clone()
        );
        register!(
            r,
            described,
            "build_info",
            Kind::Gauge,
            &["version", "executor"],
            "Always 1; the labels say which build runs and with which executor",
            f.build_info.clone()
        );
        families
            .build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                executor: executor.to_owned(),
            })
            .set(1);
        Self {
            inner: Arc::new(Inner {
                registry,
                described,
                families,
                bounded: BoundedValues::default(),
                snapshot: tokio::sync::Mutex::new(None),
                created: std::time::Instant::now(),
            }),
        }
    }

    /// Every family, in registration order (the metrics reference of the docs).
    #[must_use]
    pub fn described(&self) -> &[Described] {
        &self.inner.described
    }

    /// The families, to record into.
    #[must_use]
    pub fn families(&self) -> &Families {
        &self.inner.families
    }

    /// `value` itself while `family` has seen fewer than [`MAX_LABEL_VALUES`] distinct
    /// values, else [`OTHER`].
    #[must_use]
    pub fn bounded(&self, family: &'static str, value: &str) -> String {
        self.inner.bounded.admit(family, value)
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)?;
        Ok(text)
    }

    /// Counts an error of `component` (`api`, `store`, `queue`, `kubernetes`, `launcher`,
    /// `watcher`, `runner_reports`) of `kind` (a fixed word, never a message).
    pub fn error(&self, component: &str, kind: &str) {
        self.families()
            .errors
            .get_or_create(&ErrorLabels {
                component: component.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Records one Kubernetes API request.
    pub fn kubernetes_request(
        &self,
        verb: &str,
        resource: &str,
        code: Option<u16>,
        took: Duration,
    ) {
        let code = code.map_or_else(|| "error".to_owned(), |c| c.to_string());
        let failed = !code.starts_with('2');
        self.families()
            .kubernetes_requests
            .get_or_create(&KubernetesLabels {
                verb: verb.to_owned(),
                resource: resource.to_owned(),
                code: code.clone(),
            })
            .inc();
        self.families()
            .kubernetes_request_duration
            .get_or_create(&KubernetesLatencyLabels {
                verb: verb.to_owned(),
                resource: resource.to_owned(),
            })
            .observe(took.as_secs_f64());
        // 404 on get/delete and 409 on create are answers the dispatcher expects.
        if failed && !matches!(code.as_str(), "404" | "409") {
            self.error("kubernetes", &format!("http_{code}"));
        }
    }

    /// Records one store operation.
    pub fn store_query(&self, operation: &'static str, ok: bool, took: Duration) {
        self.families()
            .store_queries
            .get_or_create(&OperationOutcomeLabels {
                operation: operation.to_owned(),
                outcome: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
        self.families()
            .store_query_duration
            .get_or_create(&OperationLabels {
                operation: operation.to_owned(),
            })
            .observe(took.as_secs_f64());
        if !ok {
            self.error("store", operation);
        }
    }

    /// Records one queue operation.
    pub fn queue_operation(&self, operation: &'static str, ok: bool, took: Duration) {
        self.families()
            .queue_operations
            .get_or_create(&OperationOutcomeLabels {
                operation: operation.to_owned(),
                outcome: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
        self.families()
            .queue_operation_duration
            .get_or_create(&OperationLabels {
                operation: operation.to_owned(),
            })
            .observe(took.as_secs_f64());
        if !ok {
            self.error("queue", operation);
        }
    }

    /// Adds `dollars` of `resource` to a tenant's spend.
    pub fn cost(&self, tenant: &str, queue: &str, resource: &str, dollars: f64) {
        if dollars > 0.0 && dollars.is_finite() {
            self.families()
                .cost
                .get_or_create(&CostLabels {
                    tenant: self.bounded("tenant", tenant),
                    queue: self.bounded("queue", queue),
                    resource: resource.to_owned(),
                })
                .inc_by(dollars);
        }
    }

    /// Runs `refresh` unless the snapshot is younger than `max_age`; concurrent scrapes
    /// wait for one refresh instead of each querying the store.
    pub async fn refresh_snapshot<F, Fut>(&self, max_age: Duration, refresh: F)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut taken = self.inner.snapshot.lock().await;
        if let Some(at) = *taken
            && at.elapsed() < max_age
        {
            self.families().snapshot_age.set(at.elapsed().as_secs_f64());
            return;
        }
        if refresh().await {
            *taken = Some(std::time::Instant::now());
            self.families().snapshot_age.set(0.0);
        } else {
            let since = taken.unwrap_or(self.inner.created);
            self.families()
                .snapshot_age
                .set(since.elapsed().as_secs_f64());
        }
    }
}

/// Keeps the distinct values of client-chosen labels per family below a bound, so that a
/// client inventing model names cannot grow the scrape without limit.
#[derive(Debug, Default)]
pub struct BoundedValues {
    seen: Mutex<std::collections::HashMap<&'static str, HashSet<String>>>,
}

impl BoundedValues {
    fn admit(&self, family: &'static str, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let values = seen.entry(family).or_default();
        if values.contains(value) {
            return value.to_owned();
        }
        if values.len() < MAX_LABEL_VALUES {
            values.insert(value.to_owned());
            value.to_owned()
        } else {
            OTHER.to_owned()
        }
    }
}

/// The metrics reference of `docs/OBSERVABILITY.md`: one Markdown table row per family.
#[must_use]
pub fn reference_table(described: &[Described]) -> String {
    let mut table = String::from("| Metric | Type | Labels | Meaning |\n|---|---|---|---|\n");
    for family in described {
        let labels = if family.labels.is_empty() {
            "none".to_owned()
        } else {
            family
                .labels
                .iter()
                .map(|label| format!("`{label}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            table,
            "| `{}` | {} | {} | {} |",
            family.name,
            family.kind.as_str(),
            labels,
            family.help
        );
    }
    table
}

/// The names of every family as they appear in the text (`# TYPE` lines): for the
/// documentation test.
#[must_use]
pub fn family_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            let name = words.next()?;
            let kind = words.next()?;
            Some(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_a_unit_or_count_name() {
        let metrics = Metrics::new("local");
        let described = metrics.described();
        assert!(described.len() > 30, "{described:?}");
        for family in described {
            assert!(family.name.starts_with("agent_bus_"), "{family:?}");
            assert!(family.help.len() > 10, "{family:?}");
            let unit_or_count = [
                "_seconds",
                "_bytes",
                "_dollars",
                "_ratio",
                "_total",
                "_per_hour",
                "_info",
                "_fds",
                "_connections",
            ]
            .iter()
            .any(|suffix| family.name.ends_with(suffix))
                || family.kind == Kind::Gauge;
            assert!(unit_or_count, "{family:?}");
            assert_eq!(
                family.name.ends_with("_total"),
                family.kind == Kind::Counter,
                "only counters end in _total: {family:?}"
            );
        }
        // Families with samples are in the text under the described names.
        let text = metrics.encode().unwrap_or_default();
        for name in family_names(&text) {
            assert!(
                described.iter().any(|family| family.name == name),
                "{name} is described"
            );
        }
        assert!(text.contains("agent_bus_build_info{version=\""));
    }

    /// The label names of every sample line equal its family's described labels.
    #[test]
    fn samples_carry_exactly_the_described_labels() {
        let metrics = Metrics::new("kubernetes");
        metrics.error("store", "transition");
        metrics.kubernetes_request("create", "jobs", Some(201), Duration::from_millis(2));
        metrics.store_query("transition", true, Duration::from_millis(2));
        metrics.queue_operation("enqueue", true, Duration::from_millis(2));
        metrics.cost("acme", "gpu", "gpu", 1.5);
        metrics.families().launches_in_flight.inc();
        let text = metrics.encode().unwrap_or_default();
        let mut checked = 0;
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, _) = line.split_once(' ').unwrap_or((line, ""));
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let mut keys: Vec<&str> = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| pair.split_once('=').map(|(k, _)| k))
                .collect();
            let family = metrics
                .described()
                .iter()
                .find(|f| {
                    f.name == name
                        || (f.kind == Kind::Histogram
                            && ["_bucket", "_sum", "_count"]
                                .iter()
                                .any(|suffix| name == format!("{}{suffix}", f.name)))
                        || (f.kind == Kind::Counter
                            && name == format!("{}_created", f.name.trim_end_matches("_total")))
                })
                .unwrap_or_else(|| panic!("{name} is described"));
            keys.retain(|k| *k != "le");
            let mut described: Vec<&str> = family.labels.to_vec();
            keys.sort_unstable();
            described.sort_unstable();
            assert_eq!(keys, described, "{line}");
            checked += 1;
        }
        assert!(checked > 10, "{text}");
    }

    /// docs/OBSERVABILITY.md lists exactly these families, between its markers. On a
    /// mismatch the expected table is written to `$TMPDIR/agent-bus-metrics-reference.md`
    /// to paste.
    #[test]
    fn the_documentation_lists_every_family() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let docs = std::fs::read_to_string(root.join("docs/OBSERVABILITY.md")).unwrap_or_default();
        let start = "<!-- metrics-reference:start -->\n";
        let end = "<!-- metrics-reference:end -->";
        let documented = docs
            .split_once(start)
            .and_then(|(_, rest)| rest.split_once(end))
            .map(|(table, _)| table.to_owned())
            .unwrap_or_default();
        let expected = reference_table(Metrics::new("local").described());
        if documented != expected {
            let out = std::env::temp_dir().join("agent-bus-metrics-reference.md");
            let _ = std::fs::write(&out, &expected);
            panic!(
                "docs/OBSERVABILITY.md's metrics reference differs from the code; the table to paste between its markers is in {}",
                out.display()
            );
        }
    }

    #[test]
    fn client_chosen_label_values_are_bounded() {
        let metrics = Metrics::default();
        for i in 0..MAX_LABEL_VALUES {
            assert_eq!(metrics.bounded("model", &format!("m{i}")), format!("m{i}"));
        }
        assert_eq!(metrics.bounded("model", "one-too-many"), OTHER);
        assert_eq!(metrics.bounded("model", "m3"), "m3", "known values stay");
        assert_eq!(metrics.bounded("tenant", "acme"), "acme", "per family");
    }

    #[test]
    fn expected_kubernetes_answers_are_not_errors() {
        let metrics = Metrics::default();
        metrics.kubernetes_request("create", "jobs", Some(409), Duration::from_millis(3));
        metrics.kubernetes_request("get", "jobs", Some(404), Duration::from_millis(3));
        metrics.kubernetes_request("create", "jobs", Some(500), Duration::from_millis(3));
        metrics.kubernetes_request("list", "pods", None, Duration::from_millis(3));
        let text = metrics.encode().unwrap_or_default();
        assert!(
            text.contains(r#"agent_bus_errors_total{component="kubernetes",kind="http_500"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"agent_bus_errors_total{component="kubernetes",kind="http_error"} 1"#)
        );
        assert!(!text.contains("http_409"));
    }
}
