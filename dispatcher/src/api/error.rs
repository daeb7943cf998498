//! The one error shape of the API: `{"error": {"code", "message", "field"}}`.
//! 4xx responses say what was wrong; 5xx responses say nothing internal (the detail goes
//! to the log, with the request id the client also sees).

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::queue::QueueError;
use crate::secrets::SecretError;
use crate::store::StoreError;
use crate::task::submission::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    Invalid(FieldError),
    /// A well-formed request the tenant's current state refuses: a reference to a
    /// secret (or key) it does not have (`secret_not_found`), or one secret more than it
    /// may keep (`too_many_secrets`). 409 names the field like a 422, but says the
    /// request itself is valid: it may succeed once the state changes.
    #[error("{error}")]
    Conflict {
        code: &'static str,
        error: FieldError,
    },
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    BadReportToken(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("tenant '{tenant}' is disabled: its requests are refused until an operator enables it")]
    TenantDisabled { tenant: String },
    #[error("task not found")]
    NotFound,
    /// No secret of that name for this tenant (another tenant's is the same answer).
    #[error("secret not found")]
    SecretNotFound,
    #[error("the Idempotency-Key '{key}' was already used with a different request body")]
    IdempotencyConflict { key: String },
    #[error("the tenant already has {limit} queued tasks, its quota; wait for some to start")]
    QuotaExceeded { limit: u32 },
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A budget with action `refuse` is spent; the message names the budget and when it
    /// renews.
    #[error("{0}")]
    BudgetExceeded(String),
    /// A runner reported for a task attempt that ended (or never began).
    #[error("{0}")]
    AttemptOver(String),
    /// A runner's attempt has sent as many reports as it may.
    #[error("{0}")]
    ReportsExhausted(String),
    #[error("{what} is unavailable; try again shortly")]
    Unavailable { what: &'static str },
    /// The tenant holds as many followed streams open as `--max-streams-per-tenant` allows.
    #[error(
        "this tenant already follows {limit} streams in this dispatcher process, its limit; close one or try again later"
    )]
    TooManyStreams { limit: usize },
    /// More requests are being handled than `--max-in-flight-requests` allows.
    #[error("the dispatcher is handling {max_in_flight} requests, its limit; try again shortly")]
    Overloaded { max_in_flight: usize },
    #[error("internal error")]
    Internal(String),
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `invalid_field`.
    pub code: &'static str,
    /// What was wrong, for a person.
    pub message: String,
    /// The JSON path of the offending field, when one is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            Self::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
            Self::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            Self::Unauthorized | Self::BadReportToken(_) => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::TenantDisabled { .. } => (StatusCode::FORBIDDEN, "tenant_disabled"),
            Self::NotFound | Self::SecretNotFound => (StatusCode::NOT_FOUND, "not_found"),
            // The request is valid; the key's earlier request conflicts with it.
            Self::IdempotencyConflict { .. } => (StatusCode::CONFLICT, "idempotency_key_reused"),
            Self::QuotaExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            Self::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::BudgetExceeded(_) => (StatusCode::PAYMENT_REQUIRED, "budget_exceeded"),
            Self::AttemptOver(_) => (StatusCode::CONFLICT, "attempt_over"),
            Self::ReportsExhausted(_) => (StatusCode::TOO_MANY_REQUESTS, "reports_exhausted"),
            Self::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::TooManyStreams { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> Self {
        Self::Invalid(error)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::IdempotencyConflict { key } => Self::IdempotencyConflict { key },
            StoreError::QuotaExceeded { limit, .. } => Self::QuotaExceeded { limit },
            error @ StoreError::Unavailable { .. } => {
                tracing::warn!(error = %error, "store unavailable");
                Self::Unavailable {
                    what: "the database",
                }
            }
            error => Self::Internal(error.to_string()),
        }
    }
}

impl From<crate::lifecycle::Error> for ApiError {
    fn from(error: crate::lifecycle::Error) -> Self {
        match error {
            crate::lifecycle::Error::Store(error) => error.into(),
            // The handlers only ask for moves their task's state allows.
            crate::lifecycle::Error::Illegal(error) => Self::Internal(error.to_string()),
            crate::lifecycle::Error::Contended { .. } => Self::Unavailable {
                what: "cancellation (the task keeps changing state)",
            },
        }
    }
}

impl From<SecretError> for ApiError {
    fn from(error: SecretError) -> Self {
        match error {
            error @ SecretError::TooMany { .. } => Self::Conflict {
                code: "too_many_secrets",
                error: FieldError::new("name", error.to_string()),
            },
            SecretError::Kubernetes {
                source: kube::Error::Api(ref status),
                ..
            } if status.code < 500 && status.code != 429 => Self::Internal(error.to_string()),
            error @ SecretError::Kubernetes { .. } => {
                tracing::warn!(error = %error, "secret store unavailable");
                Self::Unavailable {
                    what: "the secret store",
                }
            }
            error => Self::Internal(error.to_string()),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        tracing::warn!(error = %error, "queue unavailable");
        Self::Unavailable { what: "the queue" }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let (message, field) = match &self {
            Self::Invalid(error) | Self::Conflict { error, .. } => {
                (error.message.clone(), Some(error.field.clone()))
            }
            Self::Internal(detail) => {
                tracing::error!(detail = %detail, "internal error");
                (self.to_string(), None)
            }
            _ => (self.to_string(), None),
        };
        let mut response = (
            status,
            Json(ErrorBody {
                error: ErrorDetail {
                    code,
                    message,
                    field,
                },
            }),
        )
            .into_response();
        match self {
            Self::Unavailable { .. } => {
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from_static("5"));
            }
            // Shedding is brief by nature: the slots free as requests finish.
            Self::Overloaded { .. } => {
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from_static("1"));
            }
            Self::TooManyStreams { .. } => {
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from_static("10"));
            }
            _ => {}
        }
        response
    }
}
