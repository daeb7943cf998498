//! `/v1/tasks` handlers: submit (with idempotency and dry run), read, cancel, and
//! the event history, plain or followed as Server-Sent Events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::attempts::{AttemptView, attempts_of};
use super::auth::Authenticated;
use super::event_feed::{EventSubscription, OutputFollow};
use super::extract::{JsonBody, QueryParams, TaskIdPath};
use super::logs::{Include, LogEventView, ProgressEventView};
use super::streams::StreamSlot;
use super::{ApiError, AppState};
use crate::cost::{Estimate, Prices, TaskCost};
use crate::launcher::job_spec::{build_job, job_name};
use crate::lifecycle::{Cancelled, TaskRenderer};
use crate::queue::QueueEntry;
use crate::report::{RunnerView, runner_view};
use crate::store::{BudgetAction, Idempotency, Inserted, NewTask, TaskEvent, Tenant};
use crate::task::quota::estimated_start;
use crate::task::submission::{FieldError, Submission, validate};
use crate::task::{Reason, Task, TaskId, TaskSpec, TaskState};

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// The window of launches whose rate estimates a queued task's start.
const LAUNCH_RATE_WINDOW: Duration = Duration::from_mins(10);

/// A task as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskView {
    pub id: String,
    pub tenant: String,
    pub state: TaskState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub attempt: u32,
    /// Retries used against `max_retries`.
    pub retries_used: u32,
    /// Free retries (disruptions, rules with action `ignore`).
    #[serde(skip_serializing_if = "is_zero")]
    pub free_retries: u32,
    /// While the task waits out a retry's backoff: when its next attempt may start; RFC
    /// 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// Nodes its next attempts keep off (an earlier attempt hit a hardware failure there).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub avoid_nodes: Vec<String>,
    /// Every attempt, first to last (shown by `GET /v1/tasks/{id}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The Kubernetes Job of the current attempt, once the task was handed to the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRef>,
    /// The GPU class of the current attempt (a fallback may differ from the request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_class: Option<String>,
    /// What the runner in the pod reported (shown by `GET /v1/tasks/{id}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerView>,
    /// What the task has cost so far (final once it is over).
    pub cost: TaskCost,
    /// The most it can cost before LLM usage (201 of a submit and dry runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_estimate: Option<Estimate>,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
    /// When the current attempt's Job (or process) was created; RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<String>,
    /// When the command started running; RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When the task reached its final state; RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// When it expires if no launcher has taken it by then (its queue TTL); RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// While queued (`GET /v1/tasks/{id}` only): 1 when it is next to launch. Counts the
    /// queued tasks of higher priority bands of its queue, its tenant's tasks before it in
    /// its band, and, from each other tenant, as many as the round-robin across tenants
    /// serves before its turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// While queued (`GET /v1/tasks/{id}` only): when it may start at the queue's launch
    /// rate of the last 10 minutes; RFC 3339. `null` when nothing launched in that window,
    /// or when its tenant's quota holds it (it then starts when one of its tasks ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, nullable)]
    pub estimated_start: Option<Option<String>>,
    #[serde(flatten)]
    pub spec: TaskSpec,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobRef {
    pub namespace: String,
    pub name: String,
}

impl TaskView {
    /// A list page's item with `view=full`: what `GET /v1/tasks/{id}` shows, without what
    /// that reads from elsewhere (`attempts`, `runner`, the queue position).
    pub(super) fn listed(task: Task, state: &AppState) -> Self {
        Self::new(task, state, None)
    }

    fn new(task: Task, state: &AppState, runner: Option<RunnerView>) -> Self {
        let namespace = state
            .cluster
            .is_some()
            .then_some(state.launch.namespace.as_str());
        Self::of(task, state.lifecycle.prices(), namespace, runner)
    }

    /// `task` as the API shows it, priced at `prices`, its Job in `job_namespace` (with
    /// the Kubernetes executor).
    #[must_use]
    pub fn of(
        task: Task,
        prices: &Prices,
        job_namespace: Option<&str>,
        runner: Option<RunnerView>,
    ) -> Self {
        let launched = !matches!(task.state, TaskState::Queued | TaskState::Launching);
        let cost = TaskCost::of(&task, prices, jiff::Timestamp::now());
        let job = job_namespace.filter(|_| launched).map(|namespace| JobRef {
            namespace: namespace.to_owned(),
            name: job_name(&task.id, task.attempt),
        });
        Self {
            id: task.id.to_string(),
            tenant: task.tenant,
            state: task.state,
            reason: task.reason,
            message: task.message,
            attempt: task.attempt,
            retries_used: task.retries.counted,
            free_retries: task.retries.ignored,
            next_attempt_at: task
                .next_attempt_at
                .filter(|_| task.state == TaskState::Queued)
                .map(|t| t.to_string()),
            avoid_nodes: task.avoid_nodes,
            attempts: None,
            exit_code: task.exit_code,
            job,
            gpu_class: task.gpu_class,
            runner,
            cost,
            cost_estimate: None,
            created_at: task.created_at.to_string(),
            updated_at: task.updated_at.to_string(),
            launched_at: task.timeline.launched_at.map(|t| t.to_string()),
            started_at: task.timeline.started_at.map(|t| t.to_string()),
            finished_at: task.timeline.finished_at.map(|t| t.to_string()),
            expires_at: task.expires_at.map(|t| t.to_string()),
            queue_position: None,
            estimated_start: None,
            spec: task.spec,
        }
    }

    fn with_attempts(mut self, attempts: Vec<AttemptView>) -> Self {
        self.attempts = Some(attempts);
        self
    }

    fn with_estimate(mut self, estimate: Estimate) -> Self {
        self.cost_estimate = Some(estimate);
        self
    }
}

/// What webhook deliveries carry as `data`: the task as `GET /v1/tasks/{id}` shows it,
/// without what that reads from elsewhere (`attempts`, `runner`, `queue_position`,
/// `estimated_start`).
#[must_use]
pub fn task_renderer(prices: Prices, job_namespace: Option<String>) -> TaskRenderer {
    TaskRenderer::new(move |task| {
        let view = TaskView::of(task.clone(), &prices, job_namespace.as_deref(), None);
        serde_json::to_value(view).unwrap_or_default()
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubmitQuery {
    /// Validate and return the Job that would be created, creating nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// The two 200 answers of a submit, for the document: a replay or a dry run.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum SubmitAnswer {
    DryRun(Box<DryRun>),
    Replayed(Box<TaskView>),
}

/// What `POST /v1/tasks?dry_run=true` answers: nothing is stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DryRun {
    pub task: TaskView,
    /// The Job manifest the launcher would create (Kubernetes executor).
    #[schema(value_type = Object)]
    pub job: serde_json::Value,
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().map(str::trim).unwrap_or_default();
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(FieldError::new(
            "Idempotency-Key",
            format!("header must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"),
        )
        .into());
    }
    Ok(Some(key.to_owned()))
}

/// Submits a task.
#[utoipa::path(
    post, path = "/v1/tasks", tag = "tasks", operation_id = "submitTask",
    params(SubmitQuery, ("Idempotency-Key" = Option<String>, Header, description = "Same key and body return the original task: 1 to 255 printable ASCII characters", min_length = 1, max_length = 255, pattern = "^[!-~]+$")),
    request_body = Submission,
    responses(
        (status = 201, description = "Stored and queued: always the `TaskView` of the new task (declared as the 200's schema, so that generators that want one success type per operation can read it)", body = SubmitAnswer,
            headers(("location" = String, description = "The task's URL, `/v1/tasks/{id}`"))),
        (status = 200, description = "A dry run (`DryRun`: the task as it would be and its Job), or the replay of an earlier request with the same Idempotency-Key (the task, with header `idempotent-replayed: true`)", body = SubmitAnswer,
            headers(("idempotent-replayed" = String, description = "`true` on a replay"))),
        (status = 400, description = "The body is not JSON (code `malformed_json`)", body = super::error::ErrorBody),
        (status = 402, description = "A budget of the tenant with action `refuse` is spent (code `budget_exceeded`)", body = super::error::ErrorBody),
        (status = 409, description = "An environment variable references a secret or key the tenant does not have (code `secret_not_found`, field `env.<VAR>`); or the Idempotency-Key was used with another body (code `idempotency_key_reused`)", body = super::error::ErrorBody),
        (status = 413, description = "The body is larger than `--max-body-bytes` (code `payload_too_large`)", body = super::error::ErrorBody),
        (status = 422, description = "A field breaks a rule, named in `field` (code `invalid_field`)", body = super::error::ErrorBody),
        (status = 429, description = "The tenant's queued tasks are at its quota (code `quota_exceeded`)", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn submit(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    QueryParams(query): QueryParams<SubmitQuery>,
    headers: HeaderMap,
    JsonBody(submission): JsonBody<Submission>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    // Hash the parsed submission, not the bytes: the same request with other whitespace
    // or key order is the same request.
    let canonical =
        serde_json::to_vec(&submission).map_err(|e| ApiError::Internal(e.to_string()))?;
    let request_hash = hex::encode(Sha256::digest(&canonical));
    let spec = validate(submission, &state.limits, &tenant.name)?;
    // Whether the secrets the task references exist (and have the keys); refused below,
    // unless the request replays one accepted before a secret was deleted.
    let references = super::secrets::check_references(&state, &tenant.name, &spec).await;
    let mut task = Task::new(tenant.name.clone(), spec);
    let queue_ttl = task
        .spec
        .queue_ttl_seconds
        .or(tenant.default_queue_ttl_seconds);
    task.expires_at = queue_ttl.and_then(|seconds| {
        task.created_at
            .checked_add(jiff::SignedDuration::from_secs(i64::from(seconds)))
            .ok()
    });
    let estimate = state.lifecycle.prices().estimate(&task);

    if query.dry_run {
        references?;
        let job =
            build_job(&task, &state.launch, None).map_err(|e| ApiError::Internal(e.to_string()))?;
        let job = serde_json::to_value(job).map_err(|e| ApiError::Internal(e.to_string()))?;
        return Ok((
            StatusCode::OK,
            Json(DryRun {
                task: TaskView::new(task, &state, None).with_estimate(estimate),
                job,
            }),
        )
            .into_response());
    }

    let idempotency = key.map(|key| Idempotency { key, request_hash });
    let new = NewTask { task, idempotency };
    // A retry of a submission accepted before a budget was spent (or a secret it
    // references was deleted) is a replay, not a new task: it gets its task back rather
    // than a 402 or 422 that says it was refused.
    let budget_may_refuse = tenant.budget.action == BudgetAction::Refuse && tenant.budget.is_set();
    let replayed = if budget_may_refuse || references.is_err() {
        state.store().existing_replay(&new).await?
    } else {
        None
    };
    let inserted = if let Some(replayed) = replayed {
        replayed
    } else {
        references?;
        refuse_over_budget(&state, &tenant).await?;
        state.store().insert_task(new).await?
    };
    match inserted {
        Inserted::Created(task) => {
            let entry = QueueEntry::of(&task);
            if let Err(error) = state.queue.enqueue(&entry).await {
                // Stored is what counts: the reconciler enqueues stored tasks the queue lacks.
                tracing::warn!(task_id = %task.id, error = %error, "enqueue failed; the reconciler will enqueue the task");
            }
            tracing::info!(task_id = %task.id, tenant = %task.tenant, queue = %task.spec.queue, "task submitted");
            state
                .metrics()
                .tasks()
                .submitted(&task.tenant, &task.spec.queue);
            let location = format!("/v1/tasks/{}", task.id);
            let view = TaskView::new(task, &state, None).with_estimate(estimate);
            let mut response = (StatusCode::CREATED, Json(view)).into_response();
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert("location", value);
            }
            Ok(response)
        }
        Inserted::Replayed(task) => {
            state.metrics().tasks().idempotent_replay(&task.tenant);
            let mut response =
                (StatusCode::OK, Json(TaskView::new(task, &state, None))).into_response();
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(response)
        }
    }
}

/// 402 when one of the tenant's budgets with action `refuse` is spent (a budget with
/// action `alert` only shows in the metrics).
async fn refuse_over_budget(state: &AppState, tenant: &Tenant) -> Result<(), ApiError> {
    let budget = tenant.budget;
    if budget.action != BudgetAction::Refuse || !budget.is_set() {
        return Ok(());
    }
    let now = jiff::Timestamp::now();
    let spending = state.spend(&tenant.name, now).await?;
    let Some(spent) = budget.refusing(&spending) else {
        return Ok(());
    };
    state
        .metrics()
        .tasks()
        .refused_over_budget(&tenant.name, spent.period);
    let renews = spent.period.next_start(now).map_or_else(String::new, |at| {
        format!("; new tasks are accepted again from {at}")
    });
    Err(ApiError::BudgetExceeded(format!(
        "{}{renews}",
        spent.describe(&tenant.name)
    )))
}

pub(super) async fn owned_task(
    state: &AppState,
    tenant: &str,
    id: TaskId,
) -> Result<Task, ApiError> {
    state
        .store()
        .get_task(tenant, id)
        .await?
        .ok_or(ApiError::NotFound)
}

/// Reads one task.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", operation_id = "getTask",
    params(("id" = String, Path, description = "Task id")),
    responses((status = 200, body = TaskView), (status = 404, description = "No such task of this tenant (code `not_found`)", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    TaskIdPath(id): TaskIdPath,
) -> Result<Json<TaskView>, ApiError> {
    let task = owned_task(&state, &tenant.name, id).await?;
    let summary = state.store().report_summary(task.id, task.attempt).await?;
    let last = state.store().last_heartbeat(task.id).await?;
    let runner = runner_view(task.attempt, &summary.reports, last.as_ref()).map(|mut view| {
        view.usage_truncated = summary.usage_truncated;
        view.reports_stored = summary.stored;
        view.report_bytes = summary.stored_bytes;
        view
    });
    let attempts = attempts_of(&task, state.store().attempts(task.id).await?);
    let wait = if task.state == TaskState::Queued {
        let now = jiff::Timestamp::now();
        let since = now
            .checked_sub(jiff::SignedDuration::try_from(LAUNCH_RATE_WINDOW).unwrap_or_default())
            .unwrap_or(now);
        let figures = state.store().wait_figures(&task, since).await?;
        let position = figures.position.position();
        let start = (task.reason != Some(Reason::TenantQuota))
            .then(|| {
                estimated_start(
                    now,
                    position - 1,
                    figures.launched_since,
                    LAUNCH_RATE_WINDOW,
                )
            })
            .flatten();
        Some((position, start.map(|at| at.to_string())))
    } else {
        None
    };
    let mut view = TaskView::new(task, &state, runner).with_attempts(attempts);
    if let Some((position, start)) = wait {
        view.queue_position = Some(position);
        view.estimated_start = Some(start);
    }
    Ok(Json(view))
}

/// Cancels a task: idempotent; a finished task is returned as it is.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks", operation_id = "cancelTask",
    params(("id" = String, Path, description = "Task id")),
    responses((status = 200, body = TaskView), (status = 404, description = "No such task of this tenant (code `not_found`)", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    TaskIdPath(id): TaskIdPath,
) -> Result<Json<TaskView>, ApiError> {
    let task = owned_task(&state, &tenant.name, id).await?;
    match state.lifecycle.cancel(task).await? {
        Cancelled::Now(cancelled) => {
            if let Err(error) = state.canceller.cancel(&cancelled).await {
                // The watcher deletes any Job still running for a cancelled task.
                tracing::warn!(task_id = %cancelled.id, error = %error, "stopping the task failed; the watcher will retry");
            }
            tracing::info!(task_id = %cancelled.id, "task cancelled");
            Ok(Json(TaskView::new(cancelled, &state, None)))
        }
        Cancelled::AlreadyEnded(task) => Ok(Json(TaskView::new(task, &state, None))),
        Cancelled::Gone => Err(ApiError::NotFound),
    }
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Stream new events as Server-Sent Events until the task finishes.
    #[serde(default)]
    pub follow: bool,
    /// Also send the runner's progress reports (`event: progress`) and the task's output
    /// lines (`event: log`): `progress`, `logs`, or both separated by a comma. The answer
    /// is then the Server-Sent Events stream, which without `follow` ends once everything
    /// so far was sent.
    pub include: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventView {
    pub id: i64,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<TaskState>,
    pub to: TaskState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// RFC 3339.
    pub at: String,
}

impl From<TaskEvent> for EventView {
    fn from(event: TaskEvent) -> Self {
        Self {
            id: event.id,
            attempt: event.attempt,
            from: event.from,
            to: event.to,
            reason: event.reason,
            message: event.message,
            exit_code: event.exit_code,
            at: event.at.to_string(),
        }
    }
}

/// One Server-Sent Event of a followed stream, for the document (keep-alive comments
/// are not events).
#[derive(Debug, utoipa::ToSchema)]
pub struct StateSseEvent {
    /// The event type: `state`.
    pub event: String,
    /// The state event's id.
    pub id: Option<String>,
    /// One `EventView` as JSON.
    pub data: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventList {
    pub items: Vec<EventView>,
}

/// The task's state history; with `follow=true`, a Server-Sent Events stream (`event:
/// state`, data: one event as JSON) that ends when the task is finished. With
/// `include=progress,logs` the answer is that stream with `event: progress` and `event:
/// log` items too; it ends once every output line of the task was sent as well, or,
/// without `follow`, once everything written so far was sent.
#[utoipa::path(get, path = "/v1/tasks/{id}/events", tag = "tasks", operation_id = "getTaskEvents",
    params(("id" = String, Path, description = "Task id"), EventsQuery),
    responses(
        (status = 200, description = "The history as JSON; with follow=true or include a Server-Sent Events stream of the same items (`event: state`, `id:` the event's id, `data:` one `EventView` as JSON), with keep-alive comments, that ends when the task has ended (follow=true; or after --max-stream-duration, 1 h by default: reconnect for the rest) or once everything so far was sent; with include, also `event: progress` items (data: one `ProgressEventView`) and `event: log` items (data: one `LogEventView`)",
            content((EventList = "application/json"), (StateSseEvent = "text/event-stream"))),
        (status = 404, description = "No such task of this tenant (code `not_found`)", body = super::error::ErrorBody),
        (status = 422, description = "A query parameter breaks a rule (field `query`, or `include`)", body = super::error::ErrorBody),
        (status = 429, description = "With follow=true: the tenant already follows --max-streams-per-tenant streams in this process (code `too_many_streams`, with `Retry-After`)", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    TaskIdPath(id): TaskIdPath,
    QueryParams(query): QueryParams<EventsQuery>,
) -> Result<Response, ApiError> {
    let include = Include::parse(query.include.as_deref())?;
    let task = owned_task(&state, &tenant.name, id).await?;
    // The JSON history lists state changes only: with `include` the answer is the
    // stream, which without `follow` ends once everything so far was sent.
    if !query.follow && !include.any() {
        let items = state
            .store()
            .events(task.id, None)
            .await?
            .into_iter()
            .map(EventView::from)
            .collect();
        return Ok(Json(EventList { items }).into_response());
    }
    // Only a followed stream stays open (and polls); a snapshot ends at once.
    let slot = if query.follow {
        Some(state.streams.open(&tenant.name)?)
    } else {
        None
    };
    let stream = follow_stream(state, &task, include, slot);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

struct Follow {
    state: AppState,
    id: TaskId,
    include: Include,
    /// Whether to wait for more once everything so far was sent (until the task ends).
    keep_open: bool,
    /// A followed stream's place among its tenant's, and when it ends at the latest.
    slot: Option<StreamSlot>,
    /// A followed stream's state events, from the process's shared poller; a snapshot
    /// reads the store once instead.
    feed: Option<EventSubscription>,
    /// A followed stream's view of the task's output mark, when it includes progress or
    /// lines: whether reading them can find anything new.
    output: Option<OutputFollow>,
    /// Whether a terminal state was sent: once the included items are read to their end
    /// too, the stream ends.
    terminal: bool,
    after: Option<i64>,
    /// The last progress report and output line sent: (attempt, sequence).
    progress_after: Option<(u32, u64)>,
    log_after: Option<(u32, u64)>,
    pending: VecDeque<SseEvent>,
    done: bool,
}

/// Items of each kind read from the store per poll.
const FOLLOW_PAGE: u32 = 500;

fn sse_json<T: Serialize>(kind: &'static str, item: &T) -> SseEvent {
    SseEvent::default()
        .event(kind)
        .data(serde_json::to_string(item).unwrap_or_default())
}

impl Follow {
    /// One read of each kind followed; whether every kind came back short of a page (all
    /// of it read), or `None` when a read failed.
    async fn poll(&mut self) -> Option<bool> {
        let store = self.state.store();
        let mut complete = true;
        // The state events first: items written before a terminal state is seen are then
        // certainly in the reads below (the runner's last output lines are stored before
        // its finished report).
        let events = match &mut self.feed {
            Some(feed) => feed.take().await,
            None => store.events(self.id, self.after).await,
        };
        match events {
            Ok(events) => {
                if let Some(last) = events.last() {
                    self.after = Some(last.id);
                }
                self.terminal |= events.iter().any(|event| event.to.is_terminal());
                for event in events.into_iter().map(EventView::from) {
                    let id = event.id.to_string();
                    self.pending.push_back(sse_json("state", &event).id(id));
                }
            }
            Err(error) => {
                tracing::warn!(task_id = %self.id, error = %error, "follow: reading events failed");
                return None;
            }
        }
        // Once the task is terminal every read counts (the last one must come back short);
        // before, a follow reads its items only when the output mark moved.
        let terminal = self.terminal;
        if !terminal
            && let Some(output) = &mut self.output
            && !output.worth_reading()
        {
            return Some(complete);
        }
        if self.include.progress {
            match store
                .progress_of_task(self.id, self.progress_after, FOLLOW_PAGE)
                .await
            {
                Ok(items) => {
                    complete &= items.len() < FOLLOW_PAGE as usize;
                    read_again_unless(&mut self.output, complete);
                    if let Some(last) = items.last() {
                        self.progress_after = Some((last.attempt, last.sequence));
                    }
                    self.pending.extend(
                        items
                            .into_iter()
                            .map(|p| sse_json("progress", &ProgressEventView::from(p))),
                    );
                }
                Err(error) => {
                    tracing::warn!(task_id = %self.id, error = %error, "follow: reading progress failed");
                    read_again_unless(&mut self.output, false);
                    return None;
                }
            }
        }
        if self.include.logs {
            match store
                .log_lines_of_task(self.id, self.log_after, FOLLOW_PAGE)
                .await
            {
                Ok(lines) => {
                    complete &= lines.len() < FOLLOW_PAGE as usize;
                    read_again_unless(&mut self.output, complete);
                    if let Some(last) = lines.last() {
                        self.log_after = Some((last.attempt, last.sequence));
                    }
                    self.pending.extend(
                        lines
                            .into_iter()
                            .map(|l| sse_json("log", &LogEventView::from(l))),
                    );
                }
                Err(error) => {
                    tracing::warn!(task_id = %self.id, error = %error, "follow: reading output failed");
                    read_again_unless(&mut self.output, false);
                    return None;
                }
            }
        }
        Some(complete)
    }
}

/// After a read that failed or stopped at a page, the next poll reads again whatever the
/// output mark says.
fn read_again_unless(output: &mut Option<OutputFollow>, complete: bool) {
    if !complete && let Some(output) = output {
        output.read_again();
    }
}

/// Events as they are written, from the process's shared poller (any process may write
/// them), until the task is terminal (or, without a followed stream's `slot`, at once)
/// and every event (and included item) up to that point was sent, or a followed stream
/// reached `--max-stream-duration`.
fn follow_stream(
    state: AppState,
    task: &Task,
    include: Include,
    slot: Option<StreamSlot>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + use<> {
    // Subscribed before the history is read (at the first poll), so nothing written in
    // between is missed.
    let feed = slot
        .as_ref()
        .map(|_| state.event_feed.subscribe(task.id, None));
    let output = slot
        .as_ref()
        .filter(|_| include.progress || include.logs)
        .map(|_| state.event_feed.follow_output(task.id));
    let start = Follow {
        state,
        id: task.id,
        include,
        keep_open: slot.is_some(),
        slot,
        feed,
        output,
        terminal: false,
        after: None,
        progress_after: None,
        log_after: None,
        pending: VecDeque::default(),
        done: false,
    };
    futures::stream::unfold(start, |mut follow| async move {
        loop {
            if let Some(sse) = follow.pending.pop_front() {
                return Some((Ok(sse), follow));
            }
            if follow.done {
                return None;
            }
            if follow.slot.as_ref().is_some_and(StreamSlot::expired) {
                // Past --max-stream-duration: the client reconnects for the rest.
                return None;
            }
            if let Some(complete) = follow.poll().await {
                follow.done = (follow.terminal || !follow.keep_open) && complete;
            }
            if follow.pending.is_empty() && !follow.done {
                let poll = follow.state.follow_poll;
                match &mut follow.feed {
                    // Woken by the next event of the task, or after a poll's time for the
                    // included items and the stream's deadline.
                    Some(feed) => feed.wait(poll).await,
                    None => tokio::time::sleep(poll).await,
                }
            }
        }
    })
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(value: &u32) -> bool {
    *value == 0
}
