//! The Kubernetes API as the dispatcher uses it: every request counted and timed by a
//! tower layer on the kube client (creates, gets, deletes, lists, watches and lease
//! updates alike, without touching their call sites; watches are timed to their response
//! headers, the stream itself is long-lived), and the events the watches deliver.
//!
//! Labels come from the request line only: the verb (Kubernetes' words: get, list, watch,
//! create, update, patch, delete, deletecollection) and the resource's plural (`jobs`,
//! `pods`, `leases`); never a namespace or object name.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tower::{Layer, Service};

use super::Metrics;
use super::errors::ErrorComponent;
use super::labels::label_values;
use super::registry::{Registrar, latency_histogram};

label_values! {
    /// A request's verb, as Kubernetes names it.
    pub enum KubernetesVerb {
        Get => "get",
        List => "list",
        Watch => "watch",
        Create => "create",
        Update => "update",
        Patch => "patch",
        Delete => "delete",
        DeleteCollection => "deletecollection",
        Other => "other",
    }
}

label_values! {
    /// What a watch event is about.
    pub enum WatchedObject {
        Job => "job",
        Pod => "pod",
    }
}

/// The HTTP status of an answer, `error` when there was none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct StatusCode(Option<u16>);

impl StatusCode {
    /// Neither a 2xx nor an answer the dispatcher expects (404 on get and delete, 409 on
    /// create).
    fn is_error(self) -> bool {
        !matches!(self.0, Some(200..=299 | 404 | 409))
    }

    fn error_kind(self) -> String {
        self.0
            .map_or_else(|| "http_error".to_owned(), |code| format!("http_{code}"))
    }
}

impl EncodeLabelValue for StatusCode {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(code) => EncodeLabelValue::encode(&code, encoder),
            None => EncodeLabelValue::encode(&"error", encoder),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: KubernetesVerb,
    resource: String,
    code: StatusCode,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    verb: KubernetesVerb,
    resource: String,
}

label_values! {
    /// Why the watcher deleted a Job.
    pub enum JobDeletion {
        /// Its task's outcome is recorded (and it was kept `--keep-finished-jobs`).
        OutcomeRecorded => "outcome_recorded",
        /// It still ran for a task that ended (cancelled, heartbeat lost, expired).
        TaskEnded => "task_ended",
        /// Its attempt is no longer its task's current one (fallback, retry).
        Superseded => "superseded",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabels {
    object: WatchedObject,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeletionLabels {
    why: JobDeletion,
}

#[derive(Debug)]
pub(super) struct KubernetesFamilies {
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<LatencyLabels, Histogram>,
    watch_events: Family<ObjectLabels, Counter>,
    jobs_deleted: Family<DeletionLabels, Counter>,
}

impl KubernetesFamilies {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let families = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            watch_events: Family::default(),
            jobs_deleted: Family::default(),
        };
        registrar.counter(
            "kubernetes_requests",
            &["verb", "resource", "code"],
            "Kubernetes API requests, by verb, resource and HTTP status code (`error` without one)",
            families.requests.clone(),
        );
        registrar.histogram(
            "kubernetes_request_duration_seconds",
            &["verb", "resource"],
            "Time of a Kubernetes API request, by verb and resource",
            families.request_duration.clone(),
        );
        registrar.counter(
            "kubernetes_watch_events",
            &["object"],
            "Events received from the Kubernetes watches, by object (job, pod)",
            families.watch_events.clone(),
        );
        registrar.counter(
            "kubernetes_jobs_deleted",
            &["why"],
            "Jobs the watcher deleted, by why (outcome_recorded, task_ended, superseded); a \
             delete that failed counts as errors{component=\"watcher\",kind=\"job_delete\"} \
             and is retried by the next sweep",
            families.jobs_deleted.clone(),
        );
        families
    }
}

/// Records the dispatcher's use of the Kubernetes API.
#[derive(Debug, Clone, Copy)]
pub struct KubernetesMetrics<'a> {
    pub(super) metrics: &'a Metrics,
}

impl KubernetesMetrics<'_> {
    /// One API request answered with `code` (`None`: no answer) after `took`. Unexpected
    /// answers are also errors of component `kubernetes`.
    pub fn request(&self, verb: KubernetesVerb, resource: &str, code: Option<u16>, took: Duration) {
        let families = &self.metrics.inner.kubernetes;
        let code = StatusCode(code);
        families
            .requests
            .get_or_create(&RequestLabels {
                verb,
                resource: resource.to_owned(),
                code,
            })
            .inc();
        families
            .request_duration
            .get_or_create(&LatencyLabels {
                verb,
                resource: resource.to_owned(),
            })
            .observe(took.as_secs_f64());
        if code.is_error() {
            self.metrics
                .error(ErrorComponent::Kubernetes, code.error_kind());
        }
    }

    /// One event from the watch of `object`s.
    pub fn watch_event(&self, object: WatchedObject) {
        self.metrics
            .inner
            .kubernetes
            .watch_events
            .get_or_create(&ObjectLabels { object })
            .inc();
    }

    /// The watcher deleted a Job (its delete was accepted, or it was gone already).
    pub fn job_deleted(&self, why: JobDeletion) {
        self.metrics
            .inner
            .kubernetes
            .jobs_deleted
            .get_or_create(&DeletionLabels { why })
            .inc();
    }

    /// Deleting a Job failed; the next sweep tries again.
    pub fn job_delete_failed(&self) {
        self.metrics.error(ErrorComponent::Watcher, "job_delete");
    }

    /// A watch stream failed (it retries with backoff): an error of the watcher.
    pub fn watch_failed(&self) {
        self.metrics.error(ErrorComponent::Watcher, "watch_stream");
    }
}

/// The layer to give `kube::client::ClientBuilder::with_layer`.
#[derive(Debug, Clone)]
pub struct KubernetesMetricsLayer {
    metrics: Metrics,
}

impl KubernetesMetricsLayer {
    #[must_use]
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for KubernetesMetricsLayer {
    type Service = KubernetesMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        KubernetesMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct KubernetesMetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, ReqBody, ResBody> Service<axum::http::Request<ReqBody>> for KubernetesMetricsService<S>
where
    S: Service<axum::http::Request<ReqBody>, Response = axum::http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<ReqBody>) -> Self::Future {
        let (verb, resource) = classify(
            request.method(),
            request.uri().path(),
            request.uri().query().unwrap_or_default(),
        );
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = result.as_ref().ok().map(|r| r.status().as_u16());
            metrics
                .kubernetes()
                .request(verb, &resource, code, started.elapsed());
            result
        })
    }
}

/// The verb and resource of a Kubernetes API request. Paths are
/// `/api/v1[/namespaces/NS]/RESOURCE[/NAME[/SUB]]` and
/// `/apis/GROUP/VERSION[/namespaces/NS]/RESOURCE[/NAME[/SUB]]`; anything else (`/version`,
/// discovery) is resource `other`.
#[must_use]
pub fn classify(method: &axum::http::Method, path: &str, query: &str) -> (KubernetesVerb, String) {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    let rest = match rest {
        ["namespaces", _namespace, more @ ..] if !more.is_empty() => more,
        other => other,
    };
    let (resource, named) = match rest {
        [] => ("other".to_owned(), false),
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
    };
    let watching = query
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1");
    let verb = match *method {
        axum::http::Method::GET if watching => KubernetesVerb::Watch,
        axum::http::Method::GET if named => KubernetesVerb::Get,
        axum::http::Method::GET => KubernetesVerb::List,
        axum::http::Method::POST => KubernetesVerb::Create,
        axum::http::Method::PUT => KubernetesVerb::Update,
        axum::http::Method::PATCH => KubernetesVerb::Patch,
        axum::http::Method::DELETE if named => KubernetesVerb::Delete,
        axum::http::Method::DELETE => KubernetesVerb::DeleteCollection,
        _ => KubernetesVerb::Other,
    };
    (verb, resource)
}

#[cfg(test)]
mod tests {
    use axum::http::Method;

    use super::classify;

    #[test]
    fn requests_are_named_as_kubernetes_names_them() {
        let cases = [
            (
                Method::POST,
                "/apis/batch/v1/namespaces/t/jobs",
                "",
                ("create", "jobs"),
            ),
            (
                Method::GET,
                "/apis/batch/v1/namespaces/t/jobs/ab-1",
                "",
                ("get", "jobs"),
            ),
            (
                Method::GET,
                "/apis/batch/v1/namespaces/t/jobs",
                "labelSelector=x",
                ("list", "jobs"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/t/pods",
                "watch=true&resourceVersion=5",
                ("watch", "pods"),
            ),
            (
                Method::DELETE,
                "/apis/batch/v1/namespaces/t/jobs/ab-1",
                "",
                ("delete", "jobs"),
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/d/leases/w",
                "",
                ("update", "leases"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/t/pods/p/log",
                "",
                ("get", "pods/log"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces",
                "",
                ("list", "namespaces"),
            ),
            (Method::GET, "/version", "", ("list", "other")),
        ];
        for (method, path, query, (verb, resource)) in cases {
            let (classified_verb, classified_resource) = classify(&method, path, query);
            assert_eq!(
                (classified_verb.as_str(), classified_resource),
                (verb, resource.to_owned()),
                "{method} {path}?{query}"
            );
        }
    }
}
