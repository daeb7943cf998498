//! `POST /internal/v1/tasks/{id}/attempts/{attempt}/reports`: where the runner inside a
//! task's pod reports. Authenticated by the per-attempt report token, never by a tenant
//! key; idempotent per (task, attempt, sequence).
//!
//! Bounds: every string and list of a report is bounded, a usage report's `cost_usd` is
//! finite and at most `--max-report-cost-usd` (422 naming the field); an attempt's
//! reports are taken until `--reports-after-end` past its end (then 409) and up to its
//! allowance of reports and bytes (then 429, nothing of the batch stored).
//!
//! Effects: a new `started` of the current attempt moves the task to `running`; every
//! batch of the current attempt refreshes its last sign of life (heartbeat-lost detection
//! in the watcher reads it); the rest is stored and shown by `GET /v1/tasks/{id}`.

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use protocol::{Outcome, ReportBatch, ReportBody};
use serde::Serialize;

use super::auth::bearer_token;
use super::extract::{AttemptPath, JsonBody};
use super::{ApiError, AppState};
use crate::report::TokenError;
use crate::store::{Exhausted, Recording, ReportAllowance};
use crate::task::{TaskId, submission::FieldError};

/// The most reports one batch may carry (the runner sends far fewer).
const MAX_BATCH: usize = 1000;
/// The longest `sent_at` (an RFC 3339 time is about 30 bytes).
const MAX_SENT_AT_BYTES: usize = 64;
/// The longest progress message (the runner cuts them at 1 KiB).
const MAX_MESSAGE_BYTES: usize = 1024;
/// The longest model name (the runner's own limit).
const MAX_MODEL_BYTES: usize = 256;
/// The longest host name, runner version, GPU name or GPU UUID.
const MAX_NAME_BYTES: usize = 256;
/// The most GPUs a started report or a heartbeat lists.
const MAX_GPUS: usize = 64;
/// The longest stderr tail of a finished report (the runner keeps 2 KiB).
const MAX_STDERR_TAIL_BYTES: usize = 4096;
/// The most Xid errors a GPU summary lists (the runner keeps 16).
const MAX_XID_ERRORS: usize = 64;
/// The most calls or tokens one usage report may count: far above any real report,
/// and low enough that no sum of them wraps a counter.
const MAX_USAGE_COUNT: u64 = 1_000_000_000_000;

/// What the report endpoint takes from one task attempt's runner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportLimits {
    /// Reports per attempt, and for how long after it ended.
    pub allowance: ReportAllowance,
    /// The most dollars one usage report may carry.
    pub max_cost_usd: f64,
    /// Bytes of output lines kept per attempt (not part of the report allowance).
    pub max_log_bytes: u64,
}

impl Default for ReportLimits {
    fn default() -> Self {
        Self {
            allowance: ReportAllowance::default(),
            max_cost_usd: 1000.0,
            max_log_bytes: crate::store::LogLimits::default().max_bytes,
        }
    }
}

impl ReportLimits {
    /// What the log route takes: its own cap, and the reports' time after the end.
    #[must_use]
    pub fn logs(&self) -> crate::store::LogLimits {
        crate::store::LogLimits {
            max_bytes: self.max_log_bytes,
            after_end: self.allowance.after_end,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReportReceipt {
    /// Reports new to the dispatcher.
    pub accepted: u64,
    /// Reports it already had (a resent batch).
    pub duplicates: u64,
}

/// `Err(field name)` when `value` is longer than `max` bytes.
fn bounded(value: Option<&str>, max: usize, name: &str) -> Result<(), (String, String)> {
    match value {
        Some(v) if v.len() > max => Err((name.to_owned(), format!("must be at most {max} bytes"))),
        _ => Ok(()),
    }
}

fn check_outcome(outcome: &Outcome) -> Result<(), (String, String)> {
    bounded(
        outcome.stderr_tail.as_deref(),
        MAX_STDERR_TAIL_BYTES,
        "stderr_tail",
    )?;
    if let Some(gpu) = &outcome.gpu
        && gpu.xid_errors.len() > MAX_XID_ERRORS
    {
        return Err((
            "gpu.xid_errors".to_owned(),
            format!("must have at most {MAX_XID_ERRORS} entries"),
        ));
    }
    Ok(())
}

/// The field of `body` that breaks a rule, and the rule.
fn check_body(body: &ReportBody, max_cost_usd: f64) -> Result<(), (String, String)> {
    match body {
        ReportBody::Started(started) => {
            bounded(started.hostname.as_deref(), MAX_NAME_BYTES, "hostname")?;
            bounded(
                started.runner_version.as_deref(),
                MAX_NAME_BYTES,
                "runner_version",
            )?;
            if started.gpus.len() > MAX_GPUS {
                return Err((
                    "gpus".to_owned(),
                    format!("must have at most {MAX_GPUS} entries"),
                ));
            }
            for (i, gpu) in started.gpus.iter().enumerate() {
                bounded(
                    gpu.name.as_deref(),
                    MAX_NAME_BYTES,
                    &format!("gpus[{i}].name"),
                )?;
                bounded(
                    gpu.uuid.as_deref(),
                    MAX_NAME_BYTES,
                    &format!("gpus[{i}].uuid"),
                )?;
            }
        }
        ReportBody::Heartbeat(heartbeat) if heartbeat.gpus.len() > MAX_GPUS => {
            return Err((
                "gpus".to_owned(),
                format!("must have at most {MAX_GPUS} entries"),
            ));
        }
        ReportBody::Heartbeat(_) => {}
        ReportBody::Progress(progress) => {
            if !(progress.percent.is_finite() && (0.0..=100.0).contains(&progress.percent)) {
                return Err(("percent".to_owned(), "must be between 0 and 100".to_owned()));
            }
            bounded(progress.message.as_deref(), MAX_MESSAGE_BYTES, "message")?;
        }
        ReportBody::Usage(usage) => {
            if usage.model.is_empty() || usage.model.len() > MAX_MODEL_BYTES {
                return Err((
                    "model".to_owned(),
                    format!("must be 1 to {MAX_MODEL_BYTES} bytes"),
                ));
            }
            if !(usage.cost_usd.is_finite() && (0.0..=max_cost_usd).contains(&usage.cost_usd)) {
                return Err((
                    "cost_usd".to_owned(),
                    format!(
                        "must be a number of dollars from 0 to {max_cost_usd} (this dispatcher's --max-report-cost-usd)"
                    ),
                ));
            }
            for (name, count) in [
                ("calls", usage.calls),
                ("input_tokens", usage.input_tokens),
                ("output_tokens", usage.output_tokens),
            ] {
                if count > MAX_USAGE_COUNT {
                    return Err((
                        name.to_owned(),
                        format!("must be at most {MAX_USAGE_COUNT}"),
                    ));
                }
            }
        }
        ReportBody::Finished(finished) => check_outcome(&finished.outcome)?,
    }
    Ok(())
}

fn check_batch(batch: &ReportBatch, max_cost_usd: f64) -> Result<(), FieldError> {
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
        if report.sent_at.len() > MAX_SENT_AT_BYTES {
            return Err(FieldError::new(
                field("sent_at"),
                format!("must be at most {MAX_SENT_AT_BYTES} bytes"),
            ));
        }
        check_body(&report.body, max_cost_usd)
            .map_err(|(name, rule)| FieldError::new(field(&name), rule))?;
    }
    Ok(())
}

/// What a refused batch is told.
fn exhausted_message(exhausted: Exhausted) -> String {
    let what = match exhausted {
        Exhausted::Reports(max) => {
            format!("{max} progress and usage reports (--max-reports-per-attempt)")
        }
        Exhausted::Bytes(max) => {
            format!("{max} bytes of progress and usage reports (--max-report-bytes-per-attempt)")
        }
        Exhausted::LifecycleReports(max) => format!("{max} started and finished reports"),
    };
    format!(
        "this task attempt has sent as many reports as it may ({what}); the batch was not stored"
    )
}

/// Takes a batch of runner reports.
#[utoipa::path(
    post,
    path = "/internal/v1/tasks/{id}/attempts/{attempt}/reports",
    operation_id = "postReport",
    params(("id" = String, Path, description = "Task id"), ("attempt" = u32, Path, description = "Attempt number")),
    request_body = ReportBatch,
    security(("report_token" = [])),
    responses(
        (status = 200, body = ReportReceipt, description = "Stored (or already stored)"),
        (status = 400, body = super::error::ErrorBody, description = "The body is not JSON (code `malformed_json`)"),
        (status = 401, body = super::error::ErrorBody, description = "No token, a forged or expired one"),
        (status = 403, body = super::error::ErrorBody, description = "The token belongs to another task or attempt"),
        (status = 404, body = super::error::ErrorBody, description = "No such task"),
        (status = 413, body = super::error::ErrorBody, description = "The body is larger than `--max-body-bytes` (code `payload_too_large`)"),
        (status = 409, body = super::error::ErrorBody, description = "The attempt ended (longer ago than its final reports may take)"),
        (status = 422, body = super::error::ErrorBody, description = "A report breaks a rule"),
        (status = 429, body = super::error::ErrorBody, description = "The attempt has sent as many reports as it may"),
    ),
    tag = "internal"
)]
pub async fn receive(
    State(state): State<AppState>,
    ReportingAttempt { id, attempt }: ReportingAttempt,
    JsonBody(batch): JsonBody<ReportBatch>,
) -> Result<Json<ReportReceipt>, ApiError> {
    let limits = state.reports;
    check_batch(&batch, limits.max_cost_usd)?;
    let recorded = match state
        .store()
        .record_reports(id, attempt, &batch.reports, &limits.allowance)
        .await?
    {
        Recording::Recorded(recorded) => recorded,
        Recording::NoTask => return Err(ApiError::NotFound),
        Recording::AttemptOver { ended_at: Some(at) } => {
            return Err(ApiError::AttemptOver(format!(
                "attempt {attempt} of task {id} ended at {at}; its reports are no longer taken"
            )));
        }
        Recording::AttemptOver { ended_at: None } => {
            return Err(ApiError::AttemptOver(format!(
                "task {id} has no attempt {attempt}"
            )));
        }
        Recording::Exhausted(exhausted) => {
            return Err(ApiError::ReportsExhausted(exhausted_message(exhausted)));
        }
    };
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
    use protocol::{
        Finished, GpuDevice, GpuSample, Heartbeat, Outcome, Progress, Report, ReportBatch,
        ReportBody, Started, Usage,
    };

    use super::check_batch;

    const MAX_COST: f64 = 1000.0;

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
            check_batch(&batch(progress(101.0), 1), MAX_COST)
                .unwrap_err()
                .field,
            "reports[0].percent"
        );
        assert_eq!(
            check_batch(&batch(progress(f64::NAN), 1), MAX_COST)
                .unwrap_err()
                .field,
            "reports[0].percent"
        );
        assert_eq!(
            check_batch(&batch(progress(1.0), 0), MAX_COST)
                .unwrap_err()
                .field,
            "reports[0].sequence"
        );
        assert!(check_batch(&batch(progress(100.0), 1), MAX_COST).is_ok());
    }

    #[test]
    fn every_string_and_list_is_bounded_and_cost_is_capped() {
        let usage = |cost_usd, model: &str| {
            ReportBody::Usage(Usage {
                model: model.to_owned(),
                cost_usd,
                ..Usage::default()
            })
        };
        let field = |body| check_batch(&batch(body, 1), MAX_COST).map_err(|e| e.field);
        assert_eq!(field(usage(1e308, "m")), Err("reports[0].cost_usd".into()));
        assert_eq!(field(usage(1000.5, "m")), Err("reports[0].cost_usd".into()));
        assert_eq!(field(usage(-0.5, "m")), Err("reports[0].cost_usd".into()));
        assert_eq!(field(usage(1000.0, "m")), Ok(()));
        assert_eq!(
            field(usage(1.0, &"m".repeat(257))),
            Err("reports[0].model".into())
        );
        assert_eq!(field(usage(1.0, &"m".repeat(256))), Ok(()));
        assert_eq!(
            field(ReportBody::Progress(Progress {
                percent: 1.0,
                message: Some("x".repeat(1025)),
            })),
            Err("reports[0].message".into())
        );
        assert_eq!(
            field(ReportBody::Started(Started {
                hostname: Some("h".repeat(300)),
                ..Started::default()
            })),
            Err("reports[0].hostname".into())
        );
        assert_eq!(
            field(ReportBody::Started(Started {
                gpus: vec![
                    GpuDevice {
                        name: Some("n".repeat(300)),
                        ..GpuDevice::default()
                    };
                    2
                ],
                ..Started::default()
            })),
            Err("reports[0].gpus[0].name".into())
        );
        assert_eq!(
            field(ReportBody::Heartbeat(Heartbeat {
                gpus: vec![GpuSample::default(); 65],
                ..Heartbeat::default()
            })),
            Err("reports[0].gpus".into())
        );
        assert_eq!(
            field(ReportBody::Finished(Finished {
                outcome: Outcome {
                    stderr_tail: Some("e".repeat(5000)),
                    ..Outcome::default()
                },
                ..Finished::default()
            })),
            Err("reports[0].stderr_tail".into())
        );
        let mut long_sent_at = batch(usage(1.0, "m"), 1);
        long_sent_at.reports[0].sent_at = "t".repeat(65);
        assert_eq!(
            check_batch(&long_sent_at, MAX_COST).unwrap_err().field,
            "reports[0].sent_at"
        );
    }
}
