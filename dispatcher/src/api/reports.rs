//! `POST /internal/v1/tasks/{id}/attempts/{attempt}/reports`: where the runner inside a
//! task's pod reports. Authenticated by the per-attempt report token, never by a tenant
//! key; idempotent per (task, attempt, sequence).
//!
//! Effects: a new `started` of the current attempt moves the task to `running`; every
//! batch of the current attempt refreshes its last sign of life (heartbeat-lost detection
//! in the watcher reads it); the rest is stored and shown by `GET /v1/tasks/{id}`.

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use protocol::{ReportBatch, ReportBody};
use serde::Serialize;

use super::auth::bearer_token;
use super::extract::{AttemptPath, JsonBody};
use super::{ApiError, AppState};
use crate::report::TokenError;
use crate::task::{TaskId, submission::FieldError};

/// The most reports one batch may carry (the runner sends far fewer).
const MAX_BATCH: usize = 1000;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReportReceipt {
    /// Reports new to the dispatcher.
    pub accepted: u64,
    /// Reports it already had (a resent batch).
    pub duplicates: u64,
}

fn check_batch(batch: &ReportBatch) -> Result<(), FieldError> {
    if batch.reports.len() > MAX_BATCH {
        return Err(FieldError::new(
            "reports",
            format!("must have at most {MAX_BATCH} entries"),
        ));
    }
    for (index, report) in batch.reports.iter().enumerate() {
        let field = |name: &str| format!("reports[{index}].{name}");
        if report.sequence == 0 || report.sequence > i64::MAX as u64 {
            return Err(FieldError::new(
                field("sequence"),
                "must be between 1 and 2^63-1",
            ));
        }
        match &report.body {
            ReportBody::Progress(progress)
                if !(progress.percent.is_finite() && (0.0..=100.0).contains(&progress.percent)) =>
            {
                return Err(FieldError::new(
                    field("percent"),
                    "must be between 0 and 100",
                ));
            }
            ReportBody::Usage(usage) if usage.model.is_empty() || usage.model.len() > 200 => {
                return Err(FieldError::new(
                    field("model"),
                    "must be 1 to 200 characters",
                ));
            }
            ReportBody::Usage(usage) if !(usage.cost_usd.is_finite() && usage.cost_usd >= 0.0) => {
                return Err(FieldError::new(
                    field("cost_usd"),
                    "must be a number of dollars, 0 or more",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Takes a batch of runner reports.
#[utoipa::path(
    post,
    path = "/internal/v1/tasks/{id}/attempts/{attempt}/reports",
    params(("id" = String, Path, description = "Task id"), ("attempt" = u32, Path, description = "Attempt number")),
    request_body = ReportBatch,
    security(("report_token" = [])),
    responses(
        (status = 200, body = ReportReceipt, description = "Stored (or already stored)"),
        (status = 401, body = super::error::ErrorBody, description = "No token, a forged or expired one"),
        (status = 403, body = super::error::ErrorBody, description = "The token belongs to another task or attempt"),
        (status = 404, body = super::error::ErrorBody, description = "No such task"),
        (status = 422, body = super::error::ErrorBody, description = "A report breaks a rule"),
    ),
    tag = "internal"
)]
pub async fn receive(
    State(state): State<AppState>,
    ReportingAttempt { id, attempt }: ReportingAttempt,
    JsonBody(batch): JsonBody<ReportBatch>,
) -> Result<Json<ReportReceipt>, ApiError> {
    check_batch(&batch)?;
    let recorded = state
        .store()
        .record_reports(id, attempt, &batch.reports)
        .await?
        .ok_or(ApiError::NotFound)?;
    state.lifecycle.reports_recorded(&recorded, &batch.reports);
    if recorded.started {
        state.lifecycle.runner_started(&recorded.task).await?;
    }
    Ok(Json(ReportReceipt {
        accepted: recorded.accepted,
        duplicates: recorded.duplicates,
    }))
}

/// The task attempt a report request speaks for: the path's, once its bearer token is
/// verified for exactly that attempt (401 without a valid token, 403 for another
/// attempt's). Checked before the body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportingAttempt {
    pub id: TaskId,
    pub attempt: u32,
}

impl FromRequestParts<AppState> for ReportingAttempt {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let AttemptPath { id, attempt } = AttemptPath::from_request_parts(parts, state).await?;
        let headers: &HeaderMap = &parts.headers;
        let token = bearer_token(headers)
            .ok_or_else(|| ApiError::BadReportToken("missing report token".to_owned()))?;
        state
            .report_tokens
            .verify(token, id, attempt, jiff::Timestamp::now())
            .map_err(|error| match error {
                TokenError::WrongTask { .. } => ApiError::Forbidden(error.to_string()),
                other => ApiError::BadReportToken(other.to_string()),
            })?;
        Ok(Self { id, attempt })
    }
}

#[cfg(test)]
mod tests {
    use protocol::{Progress, Report, ReportBatch, ReportBody};

    use super::check_batch;

    fn batch(body: ReportBody, sequence: u64) -> ReportBatch {
        ReportBatch {
            reports: vec![Report {
                sequence,
                sent_at: String::new(),
                body,
            }],
        }
    }

    #[test]
    fn bad_reports_name_their_field() {
        let progress = |percent| {
            ReportBody::Progress(Progress {
                percent,
                message: None,
            })
        };
        assert_eq!(
            check_batch(&batch(progress(101.0), 1)).unwrap_err().field,
            "reports[0].percent"
        );
        assert_eq!(
            check_batch(&batch(progress(f64::NAN), 1))
                .unwrap_err()
                .field,
            "reports[0].percent"
        );
        assert_eq!(
            check_batch(&batch(progress(1.0), 0)).unwrap_err().field,
            "reports[0].sequence"
        );
        assert!(check_batch(&batch(progress(100.0), 1)).is_ok());
    }
}
