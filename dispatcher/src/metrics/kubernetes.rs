//! Counts and times every Kubernetes API request the dispatcher makes, as a tower layer
//! on the kube client: creates, gets, deletes, lists, watches and lease updates alike,
//! without touching their call sites. Watches are timed to their response headers (the
//! stream itself is long-lived).
//!
//! Labels come from the request line only: the verb (Kubernetes' words: get, list, watch,
//! create, update, patch, delete, deletecollection) and the resource's plural (`jobs`,
//! `pods`, `leases`); never a namespace or object name.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use super::Metrics;

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
            metrics.kubernetes_request(verb, &resource, code, started.elapsed());
            result
        })
    }
}

/// The verb and resource of a Kubernetes API request. Paths are
/// `/api/v1[/namespaces/NS]/RESOURCE[/NAME[/SUB]]` and
/// `/apis/GROUP/VERSION[/namespaces/NS]/RESOURCE[/NAME[/SUB]]`; anything else (`/version`,
/// discovery) is resource `other`.
#[must_use]
pub fn classify(method: &axum::http::Method, path: &str, query: &str) -> (&'static str, String) {
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
        axum::http::Method::GET if watching => "watch",
        axum::http::Method::GET if named => "get",
        axum::http::Method::GET => "list",
        axum::http::Method::POST => "create",
        axum::http::Method::PUT => "update",
        axum::http::Method::PATCH => "patch",
        axum::http::Method::DELETE if named => "delete",
        axum::http::Method::DELETE => "deletecollection",
        _ => "other",
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
            assert_eq!(
                classify(&method, path, query),
                (verb, resource.to_owned()),
                "{method} {path}?{query}"
            );
        }
    }
}
