//! The REST API (v1): submit, read, list, cancel and follow tasks, read their output;
//! write, list and delete
//! the tenant's secrets (never read their values); health probes; the OpenAPI document.
//! `router(state)` is the whole API, testable without a socket;
//! `metrics_router(state)` is what the separate metrics listener serves.
//!
//! Invariants:
//! - every `/v1` query is scoped to the tenant of the bearer key; another tenant's task is
//!   a 404, indistinguishable from a missing one;
//! - a task is stored before it is enqueued, and a 201 means it is stored: if the enqueue
//!   fails, the queue reconciler enqueues it later;
//! - nothing a client sends yields a 500;
//! - a secret's values go from `PUT /v1/secrets/{name}` into the secret store only: no
//!   answer, log line or stored row holds one, and a task holds only references;
//! - `/internal/v1` is for runners: it takes only per-attempt report tokens, never tenant
//!   keys, and a token speaks for its own task attempt only (403 otherwise);
//! - `/metrics` (every tenant's names, spend and models) is never on the api's listener,
//!   only on the metrics listener (`--metrics-listen`), which deployments keep off the
//!   Ingress and away from task pods; `/healthz` and `/readyz` are on both;
//! - `/readyz` checks its dependencies at most about once a second per process
//!   ([`readiness`]);
//! - at most `--max-in-flight-requests` API requests are handled at once; more are
//!   answered 503 `overloaded` with `Retry-After` at once ([`admission`]); the probes
//!   and `/metrics` are never shed;
//! - a tenant follows at most `--max-streams-per-tenant` streams per process, each for at
//!   most `--max-stream-duration` ([`streams`]); followed event streams read the store
//!   through one shared poller per process ([`event_feed`]), not a query each.

pub mod admission;
pub mod attempts;
pub mod auth;
pub mod error;
pub mod event_feed;
pub mod extract;
pub mod logs;
pub mod openapi;
pub mod readiness;
pub mod reports;
pub mod secrets;
pub mod streams;
pub mod task_list;
pub mod tasks;
pub mod usage;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::launcher::Canceller;
use crate::launcher::job_spec::LaunchConfig;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::metrics::snapshot::SnapshotConfig;
use crate::queue::Queue;
use crate::report::ReportTokens;
use crate::secrets::SecretStore;
use crate::store::Store;
use crate::task::submission::Limits;

pub use auth::{hash_api_key, new_api_key};
pub use error::ApiError;
pub use reports::ReportLimits;
/// The secret type of [`new_api_key`], for callers that hand the key on.
pub use secrecy::{ExposeSecret, SecretString};
pub use tasks::task_renderer;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Moves tasks (cancel, runner starts), and reads them through its store.
    pub lifecycle: Lifecycle,
    pub queue: Queue,
    pub limits: Arc<Limits>,
    pub launch: Arc<LaunchConfig>,
    /// Stops a task's Job or process on cancel.
    pub canceller: Canceller,
    /// Checked by `/readyz` besides the store and the queue.
    pub cluster: Option<kube::Client>,
    /// The tenants' secrets (`/v1/secrets`), and what task references are checked against.
    pub secrets: SecretStore,
    pub max_body_bytes: usize,
    /// How often a followed stream polls the store (the event feed's tick, and followed
    /// output and progress reads).
    pub follow_poll: Duration,
    /// The shared poller every followed event stream of this process reads from.
    pub event_feed: event_feed::EventFeed,
    /// The most bytes of items one `GET /v1/tasks` page holds past its first item
    /// ([`task_list::DEFAULT_PAGE_MAX_BYTES`] unless a test wants pages smaller).
    pub list_page_max_bytes: usize,
    /// Checks the tokens of runner reports.
    pub report_tokens: ReportTokens,
    /// How `/metrics` reads the state gauges.
    pub snapshot: Arc<SnapshotConfig>,
    /// What the report endpoint takes from one task attempt.
    pub reports: ReportLimits,
    /// The last `/readyz` check, shared by both listeners.
    pub readiness: Arc<readiness::Readiness>,
    /// How many API requests run at once; more are shed.
    pub admission: admission::Admission,
    /// The followed streams open, by tenant, and how long one may last.
    pub streams: Arc<streams::OpenStreams>,
}

impl AppState {
    #[must_use]
    pub fn store(&self) -> &Store {
        self.lifecycle.store()
    }

    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        self.lifecycle.metrics()
    }

    /// What `tenant` has spent this UTC day and month at `now`, unfinished tasks included.
    pub async fn spend(
        &self,
        tenant: &str,
        now: jiff::Timestamp,
    ) -> Result<crate::cost::Spend, crate::store::StoreError> {
        self.lifecycle.spend(tenant, now).await
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

/// The whole HTTP API and the probes: what the api's listener (`--listen`) serves. No
/// `/metrics` here (see [`metrics_router`]).
pub fn router(state: AppState) -> Router {
    let max_body = state.max_body_bytes;
    let router = Router::new()
        .route("/v1/tasks", post(tasks::submit).get(task_list::list))
        .route("/v1/tasks/{id}", get(tasks::get_one))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v1/tasks/{id}/events", get(tasks::events))
        .route("/v1/tasks/{id}/webhooks", get(webhooks::list))
        .route("/v1/tasks/{id}/logs", get(logs::read))
        .route(
            "/internal/v1/tasks/{id}/attempts/{attempt}/logs",
            post(logs::receive),
        )
        .route(
            "/internal/v1/tasks/{id}/attempts/{attempt}/reports",
            post(reports::receive),
        )
        .route("/v1/secrets", get(secrets::list))
        .route(
            "/v1/secrets/{name}",
            get(secrets::get_one)
                .put(secrets::put)
                .delete(secrets::delete),
        )
        .route("/v1/usage", get(usage::usage))
        .route("/openapi.json", get(openapi::serve))
        .layer(DefaultBodyLimit::max(max_body))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admission::admit,
        ));
    observed(router, state)
}

/// What the metrics listener (`--metrics-listen`) serves: `/metrics` and the probes.
pub fn metrics_router(state: AppState) -> Router {
    observed(Router::new().route("/metrics", get(metrics_text)), state)
}

/// `/healthz` and `/readyz` on `router`, with the layers every response gets: request
/// ids, a span per request, and the HTTP metrics.
pub fn observed(router: Router<AppState>, state: AppState) -> Router {
    router
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics().clone(),
            count_request,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
            let request_id = request
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            // `tenant` is filled in by authentication.
            tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id, tenant = tracing::field::Empty)
        }))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// Counts every request by method, route template (never the raw path: task ids would
/// make the label unbounded) and status, and times it.
async fn count_request(
    State(metrics): State<Metrics>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().clone();
    let response = next.run(request).await;
    // A 5xx counts as an error too, except from the probes and /metrics (a 503 from
    // /readyz is its answer).
    metrics
        .http()
        .request(&method, &route, response.status(), started.elapsed());
    response
}

/// The metrics in the OpenMetrics text format, the state gauges read from the store.
pub async fn metrics_text(State(state): State<AppState>) -> Response {
    let metrics = state.metrics();
    crate::metrics::snapshot::refresh(
        metrics,
        state.store(),
        state.lifecycle.prices(),
        &state.snapshot,
    )
    .await;
    match metrics.encode() {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => ApiError::Internal(format!("encoding metrics: {error}")).into_response(),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failing: Vec<String>,
}

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "probes", operation_id = "healthz", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        failing: Vec::new(),
    })
}

/// Ready: the store, the queue and (with the Kubernetes executor) the API server answer.
/// The answer may be up to a second old: the dependencies are checked at most about once
/// a second per process, and concurrent callers share one check.
#[utoipa::path(get, path = "/readyz", tag = "probes", operation_id = "readyz", responses((status = 200, description = "Ready", body = Health), (status = 503, description = "A dependency does not answer; `failing` says which", body = Health)))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let failing = state.readiness.failing(|| check_dependencies(&state)).await;
    if failing.is_empty() {
        (
            StatusCode::OK,
            Json(Health {
                status: "ok",
                failing,
            }),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "unavailable",
                failing,
            }),
        )
    }
}

/// One check of every dependency: a line per failing one. Counted in
/// `agent_bus_readiness_checks_total`.
async fn check_dependencies(state: &AppState) -> Vec<String> {
    let mut failing = Vec::new();
    if let Err(e) = state.store().ping().await {
        failing.push(format!("store: {e}"));
    }
    if let Err(e) = state.queue.ping().await {
        failing.push(format!("queue: {e}"));
    }
    if let Some(client) = &state.cluster
        && let Err(e) = client.apiserver_version().await
    {
        failing.push(format!("kubernetes: {e}"));
    }
    state
        .metrics()
        .http()
        .readiness_check(if failing.is_empty() {
            crate::metrics::ReadinessResult::Ready
        } else {
            crate::metrics::ReadinessResult::Unready
        });
    failing
}
