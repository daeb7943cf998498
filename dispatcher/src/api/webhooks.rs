//! `GET /v1/tasks/{id}/webhooks`: the webhook deliveries of a task (one per state change
//! its webhook was told of), each with its latest attempts: when, the status code or the
//! error. Tenant-scoped like every task route; bounded.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::auth::Authenticated;
use super::extract::TaskIdPath;
use super::tasks::owned_task;
use super::{ApiError, AppState};
use crate::store::{Delivery, DeliveryAttempt, DeliveryState};

/// The most deliveries listed (a task makes one per event, and few events).
const MAX_DELIVERIES: u32 = 100;

/// One delivery of a task's webhook.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    /// `msg_…`: the `webhook-id` header of every attempt.
    pub id: String,
    /// `task.succeeded`, `task.failed`, `task.cancelled`, `task.timed_out`,
    /// `task.expired`, `task.started`, `task.retrying`.
    pub event_type: String,
    pub url: String,
    pub state: DeliveryState,
    /// RFC 3339.
    pub created_at: String,
    /// Attempts made so far (only the latest 20 are listed).
    pub attempt_count: u32,
    /// While pending: when the next attempt is due; RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    /// When it was given up: retried for too long, or its destination is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub given_up_at: Option<String>,
    /// Why the last attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub attempts: Vec<AttemptView>,
}

/// One attempt of a delivery.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    pub attempt: u32,
    /// RFC 3339.
    pub at: String,
    /// The answer's HTTP status, when one came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// The transport error, the refusal or the status, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryList {
    pub items: Vec<DeliveryView>,
}

impl DeliveryView {
    fn of(delivery: Delivery, attempts: Vec<DeliveryAttempt>) -> Self {
        Self {
            id: delivery.id,
            event_type: delivery.event_type,
            url: delivery.url,
            state: delivery.state,
            created_at: delivery.created_at.to_string(),
            attempt_count: delivery.attempts,
            next_attempt_at: (delivery.state == DeliveryState::Pending)
                .then(|| delivery.next_attempt_at.to_string()),
            delivered_at: delivery.delivered_at.map(|t| t.to_string()),
            given_up_at: delivery.given_up_at.map(|t| t.to_string()),
            last_error: delivery.last_error,
            attempts: attempts
                .into_iter()
                .map(|attempt| AttemptView {
                    attempt: attempt.attempt,
                    at: attempt.at.to_string(),
                    status_code: attempt.status_code,
                    error: attempt.error,
                    duration_ms: attempt.duration_ms,
                })
                .collect(),
        }
    }
}

/// The webhook deliveries of a task, oldest first (at most 100), with their latest
/// attempts.
#[utoipa::path(get, path = "/v1/tasks/{id}/webhooks", tag = "tasks",
    operation_id = "listTaskWebhooks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, body = DeliveryList),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, description = "The tenant is disabled", body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 503, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    TaskIdPath(id): TaskIdPath,
) -> Result<Json<DeliveryList>, ApiError> {
    let task = owned_task(&state, &tenant.name, id).await?;
    let items = state
        .store()
        .task_deliveries(task.id, MAX_DELIVERIES)
        .await?
        .into_iter()
        .map(|(delivery, attempts)| DeliveryView::of(delivery, attempts))
        .collect();
    Ok(Json(DeliveryList { items }))
}
