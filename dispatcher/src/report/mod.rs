//! The dispatcher's side of the runner: report tokens, the report URL of an attempt, the
//! view of what a task's runner said (folded from the stored reports, pure), and the
//! retention sweep of the output lines it shipped.
//!
//! Invariants: a token is valid for exactly one (task, attempt) until its expiry; the
//! view of a task depends only on its stored reports and last heartbeat.

pub mod retention;
pub mod token;
pub mod view;

pub use token::{ReportTokens, TokenError};
pub use view::{RunnerView, runner_view};

use protocol::FailureClass;

use crate::task::{Reason, TaskId, TaskState};

/// The state and reason a failed command ends its task in, by the runner's failure
/// class: a timeout is `timed_out`, the rest `failed` with the most telling reason.
#[must_use]
pub fn outcome_of(class: FailureClass) -> (TaskState, Reason) {
    match class {
        FailureClass::Timeout => (TaskState::TimedOut, Reason::DeadlineExceeded),
        FailureClass::CudaOom => (TaskState::Failed, Reason::GpuOutOfMemory),
        FailureClass::GpuXid => (TaskState::Failed, Reason::GpuError),
        FailureClass::HostOom => (TaskState::Failed, Reason::OomKilled),
        FailureClass::UserError | FailureClass::Signal => (TaskState::Failed, Reason::ExitCode),
    }
}

/// Where runners send their reports: the dispatcher's base URL as pods reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportEndpoint {
    base_url: String,
}

impl ReportEndpoint {
    /// `base_url` such as `http://agent-bus-api.agent-bus.svc:8080` (a trailing `/` is
    /// ignored).
    #[must_use]
    pub fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
        }
    }

    /// The URL the runner of `attempt` of task `id` POSTs its reports to.
    #[must_use]
    pub fn url(&self, id: TaskId, attempt: u32) -> String {
        format!(
            "{}/internal/v1/tasks/{id}/attempts/{attempt}/reports",
            self.base_url
        )
    }
}

/// How the pod reaches the dispatcher's report endpoint for this attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportAccess {
    /// The full URL reports are POSTed to.
    pub url: String,
    /// A bearer token scoped to the task and attempt, with an expiry.
    pub token: String,
}

/// Hands each launched attempt its report URL and token.
#[derive(Debug, Clone)]
pub struct ReportIssuer {
    pub endpoint: ReportEndpoint,
    pub tokens: ReportTokens,
}

/// How long a token outlives the task's timeout: the Job deadline margin, the runner's
/// final flush and retries of its last reports.
const TOKEN_SLACK: jiff::SignedDuration = jiff::SignedDuration::from_hours(1);

impl ReportIssuer {
    /// The URL and a fresh token for the current attempt of `task`, valid for its
    /// timeout plus an hour from `now`.
    #[must_use]
    pub fn access(&self, task: &crate::task::Task, now: jiff::Timestamp) -> ReportAccess {
        let lifetime = jiff::SignedDuration::from_secs(i64::from(task.spec.timeout_seconds))
            .saturating_add(TOKEN_SLACK);
        let expires = now.saturating_add(lifetime).unwrap_or(now);
        ReportAccess {
            url: self.endpoint.url(task.id, task.attempt),
            token: self.tokens.mint(task.id, task.attempt, expires),
        }
    }
}
