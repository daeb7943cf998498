//! The HTTP API as its clients see it: requests answered, by method, route template and
//! status, and the time to answer them. A 5xx (outside the probes and `/metrics`) is also
//! an error of component `api`. Also the dependency checks behind `/readyz` (at most
//! about one a second per process, however often it is asked).

use std::time::Duration;

use axum::http::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use super::Metrics;
use super::errors::ErrorComponent;
use super::labels::label_values;
use super::registry::{Registrar, latency_histogram};

label_values! {
    /// The request's method; one the API does not serve is `other`.
    pub enum HttpMethod {
        Get => "GET",
        Post => "POST",
        Put => "PUT",
        Patch => "PATCH",
        Delete => "DELETE",
        Head => "HEAD",
        Options => "OPTIONS",
        Other => "other",
    }
}

impl HttpMethod {
    #[must_use]
    pub fn of(method: &Method) -> Self {
        match *method {
            Method::GET => Self::Get,
            Method::POST => Self::Post,
            Method::PUT => Self::Put,
            Method::PATCH => Self::Patch,
            Method::DELETE => Self::Delete,
            Method::HEAD => Self::Head,
            Method::OPTIONS => Self::Options,
            _ => Self::Other,
        }
    }
}

label_values! {
    /// What one readiness check found.
    pub enum ReadinessResult {
        /// Every dependency answered.
        Ready => "ready",
        /// At least one did not.
        Unready => "unready",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadinessLabels {
    result: ReadinessResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: HttpMethod,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: HttpMethod,
    route: String,
}

/// Routes whose 5xx is their answer (a dependency is down, counted where it failed).
const PROBE_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

#[derive(Debug)]
pub(super) struct HttpFamilies {
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    readiness_checks: Family<ReadinessLabels, Counter>,
    shed: Counter,
}

impl HttpFamilies {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let families = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            readiness_checks: Family::default(),
            shed: Counter::default(),
        };
        registrar.counter(
            "http_requests",
            &["method", "route", "status"],
            "HTTP requests answered, by method, route template and status code",
            families.requests.clone(),
        );
        registrar.histogram(
            "http_request_duration_seconds",
            &["method", "route"],
            "Time to answer an HTTP request, by method and route template",
            families.request_duration.clone(),
        );
        registrar.counter(
            "readiness_checks",
            &["result"],
            "Dependency checks (store, queue, Kubernetes API server) made to answer /readyz, by result; answers in between reuse the last check",
            families.readiness_checks.clone(),
        );
        registrar.counter(
            "http_requests_shed",
            &[],
            "API requests answered 503 overloaded at once because --max-in-flight-requests were being handled",
            families.shed.clone(),
        );
        families
    }
}

/// Records what the HTTP API answers.
#[derive(Debug, Clone, Copy)]
pub struct HttpMetrics<'a> {
    pub(super) metrics: &'a Metrics,
}

impl HttpMetrics<'_> {
    /// One request answered with `status` after `took`; `route` is the matched route
    /// template (`unmatched` without one), never the path.
    pub fn request(&self, method: &Method, route: &str, status: StatusCode, took: Duration) {
        let families = &self.metrics.inner.http;
        let method = HttpMethod::of(method);
        families
            .requests
            .get_or_create(&RequestLabels {
                method,
                route: route.to_owned(),
                status: status.as_u16(),
            })
            .inc();
        families
            .request_duration
            .get_or_create(&RouteLabels {
                method,
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
        if status.is_server_error() && !PROBE_ROUTES.contains(&route) {
            self.metrics
                .error(ErrorComponent::Api, format!("http_{}", status.as_u16()));
        }
    }

    /// One request shed: answered 503 `overloaded` without being handled.
    pub fn shed(&self) {
        self.metrics.inner.http.shed.inc();
    }

    /// One dependency check behind `/readyz`.
    pub fn readiness_check(&self, result: ReadinessResult) {
        self.metrics
            .inner
            .http
            .readiness_checks
            .get_or_create(&ReadinessLabels { result })
            .inc();
    }
}
