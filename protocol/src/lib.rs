//! The wire contract between the runner (inside each task's pod) and the dispatcher.
//!
//! The runner POSTs a [`ReportBatch`] as JSON to the URL in `AGENT_BUS_REPORT_URL`
//! (`{dispatcher}/internal/v1/tasks/{task_id}/attempts/{attempt}/reports`) with
//! `Authorization: Bearer {AGENT_BUS_REPORT_TOKEN}`. At exit it also writes a
//! [`TerminationSummary`] to the container's termination-message path, so the dispatcher
//! learns the outcome from the pod status even when every report was lost.
//!
//! Invariants:
//! - `sequence` grows by one per report of a runner process, starting from a number
//!   derived from the process's start time (unix milliseconds × 1000, see
//!   [`first_sequence`]); the dispatcher stores each (task, attempt, sequence) once, so
//!   resending a batch is always safe, and a replacement pod of the same attempt (after
//!   an eviction or a node loss) numbers its reports apart from the first pod's, so they
//!   are kept too;
//! - every field added later is optional, so old runners and new dispatchers (and the
//!   reverse) keep understanding each other; unknown fields are ignored;
//! - the termination summary fits Kubernetes' 4096-byte termination-message limit
//!   ([`TerminationSummary::to_message`] trims it until it does).

use serde::{Deserialize, Serialize};

/// Environment variables the dispatcher sets for the runner (and the runner passes on to
/// the task's command, except the token).
pub mod env {
    pub const TASK_ID: &str = "AGENT_BUS_TASK_ID";
    pub const ATTEMPT: &str = "AGENT_BUS_ATTEMPT";
    /// The full URL reports are POSTed to.
    pub const REPORT_URL: &str = "AGENT_BUS_REPORT_URL";
    /// A bearer token scoped to one task attempt, with an expiry.
    pub const REPORT_TOKEN: &str = "AGENT_BUS_REPORT_TOKEN";
    /// Seconds; 0 means no timeout.
    pub const TIMEOUT_SECONDS: &str = "AGENT_BUS_TIMEOUT_SECONDS";
    pub const HEARTBEAT_SECONDS: &str = "AGENT_BUS_HEARTBEAT_SECONDS";
    /// The file the workload appends progress and usage lines to (see the runner docs).
    pub const REPORT_FILE: &str = "AGENT_BUS_REPORT_FILE";
}

/// Kubernetes truncates termination messages longer than this.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// What one POST carries: reports in sequence order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReportBatch {
    pub reports: Vec<Report>,
}

/// One report of the runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Report {
    /// 1, 2, 3… per attempt; the idempotency key together with task and attempt.
    pub sequence: u64,
    /// When the runner made the report, RFC 3339.
    pub sent_at: String,
    #[serde(flatten)]
    pub body: ReportBody,
}

/// What a report says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReportBody {
    /// The command was spawned.
    Started(Started),
    /// The runner is alive; carries the latest GPU sample, if there are GPUs.
    Heartbeat(Heartbeat),
    /// The workload said how far it got.
    Progress(Progress),
    /// The workload used a model (LLM calls, tokens, dollars). Counts add up.
    Usage(Usage),
    /// The command ended.
    Finished(Finished),
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Started {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub runner_version: Option<String>,
    /// The GPUs NVML sees; empty without NVML or GPUs.
    #[serde(default)]
    pub gpus: Vec<GpuDevice>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuDevice {
    pub index: u32,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub memory_total_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Heartbeat {
    /// Seconds since the command was spawned.
    #[serde(default)]
    pub uptime_seconds: f64,
    /// One sample per GPU, the latest.
    #[serde(default)]
    pub gpus: Vec<GpuSample>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuSample {
    pub index: u32,
    #[serde(default)]
    pub utilization_percent: Option<f64>,
    #[serde(default)]
    pub memory_used_bytes: Option<u64>,
    #[serde(default)]
    pub memory_total_bytes: Option<u64>,
    #[serde(default)]
    pub power_watts: Option<f64>,
    #[serde(default)]
    pub temperature_celsius: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    /// 0 to 100.
    pub percent: f64,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    /// The model used, as the workload names it (`gpt-4o`, `claude-sonnet-4`).
    pub model: String,
    #[serde(default)]
    pub calls: u64,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    /// Dollars, as the workload computed them.
    #[serde(default)]
    pub cost_usd: f64,
}

/// How a command ended: what the `finished` report and the termination summary share.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Outcome {
    /// The command's exit code, or 128 + signal when a signal ended it.
    pub exit_code: i32,
    /// The signal that ended the command, if one did.
    #[serde(default)]
    pub signal: Option<i32>,
    /// `None` when the command succeeded.
    #[serde(default)]
    pub failure_class: Option<FailureClass>,
    #[serde(default)]
    pub duration_seconds: f64,
    #[serde(default)]
    pub gpu: Option<GpuSummary>,
    /// The last lines of the command's standard error (at most 2 KiB).
    #[serde(default)]
    pub stderr_tail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Finished {
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Peak resident memory of the command's process tree, from `wait4`.
    #[serde(default)]
    pub max_rss_bytes: Option<u64>,
    /// User plus system CPU time of the command.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
}

/// Why a command failed, as the runner sees it from inside the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
// The dispatcher's own `FailureClass` (of retry rules) has the plain name in the document.
#[cfg_attr(feature = "openapi", schema(as = RunnerFailureClass))]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The command exited non-zero on its own.
    UserError,
    /// The kernel's OOM killer ended the command (the container's memory limit).
    HostOom,
    /// The output says CUDA ran out of GPU memory.
    CudaOom,
    /// The GPU reported an Xid error while the command ran.
    GpuXid,
    /// The runner ended the command at the task's timeout.
    Timeout,
    /// A signal from outside (eviction, cancel, node shutdown) ended the command.
    Signal,
}

impl FailureClass {
    pub const ALL: [Self; 6] = [
        Self::UserError,
        Self::HostOom,
        Self::CudaOom,
        Self::GpuXid,
        Self::Timeout,
        Self::Signal,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserError => "user_error",
            Self::HostOom => "host_oom",
            Self::CudaOom => "cuda_oom",
            Self::GpuXid => "gpu_xid",
            Self::Timeout => "timeout",
            Self::Signal => "signal",
        }
    }

    /// The class of this name.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// GPU figures over the whole run: means and maxima of the samples, per run not per GPU.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuSummary {
    pub gpus: u32,
    pub samples: u64,
    #[serde(default)]
    pub utilization_mean_percent: Option<f64>,
    #[serde(default)]
    pub utilization_max_percent: Option<f64>,
    #[serde(default)]
    pub memory_used_max_bytes: Option<u64>,
    #[serde(default)]
    pub memory_total_bytes: Option<u64>,
    #[serde(default)]
    pub power_mean_watts: Option<f64>,
    #[serde(default)]
    pub power_max_watts: Option<f64>,
    #[serde(default)]
    pub temperature_max_celsius: Option<f64>,
    /// Xid error codes seen, in order (at most 16).
    #[serde(default)]
    pub xid_errors: Vec<u64>,
}

/// The runner's last word, written to the termination-message path.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TerminationSummary {
    /// Format version, 1.
    pub v: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// LLM usage summed per model.
    #[serde(default)]
    pub usage: Vec<Usage>,
    /// Reports still undelivered when the runner gave up at exit.
    #[serde(default)]
    pub undelivered_reports: u64,
    /// The sequence of this runner's first report: its usage reports are those from here
    /// on (an earlier pod of the same attempt numbered below it). 0 from older runners.
    #[serde(default)]
    pub first_sequence: u64,
}

/// The first report sequence of a runner that starts at unix millisecond `started_ms`:
/// `started_ms × 1000` (at least 1; 0 is the dispatcher's termination record). A pod
/// started later, even a millisecond, numbers above every report an earlier one could
/// send at up to a thousand reports per millisecond it ran.
#[must_use]
pub fn first_sequence(started_ms: i64) -> u64 {
    u64::try_from(started_ms)
        .unwrap_or_default()
        .saturating_mul(1000)
        .clamp(1, i64::MAX as u64)
}

/// What one POST of log lines carries (to `{report URL's attempt}/logs`, the sibling of
/// `/reports`, with the same token): the task's output lines in the order the runner
/// read them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogBatch {
    pub lines: Vec<LogLine>,
}

/// One line of the task's output, without its newline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    /// Grows by one per line of a runner process, from [`first_sequence`] like reports':
    /// the idempotency key together with task and attempt, and the order of the lines.
    pub sequence: u64,
    pub stream: LogStream,
    /// When the runner read the line, RFC 3339.
    pub time: String,
    /// The text (invalid UTF-8 replaced; a very long line cut, with a marker).
    pub line: String,
}

/// Which output a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// The dispatcher's answer to a [`LogBatch`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogReceipt {
    /// Lines new to the dispatcher.
    pub accepted: u64,
    /// Lines it already had (a resent batch).
    pub duplicates: u64,
    /// The attempt's log reached the dispatcher's cap: lines past it are not kept, so
    /// the runner stops sending them.
    #[serde(default)]
    pub capped: bool,
}

/// The log URL of an attempt, from its report URL: `…/reports` → `…/logs`.
#[must_use]
pub fn log_url(report_url: &str) -> Option<String> {
    report_url
        .strip_suffix("/reports")
        .map(|base| format!("{base}/logs"))
}

impl TerminationSummary {
    /// The summary as compact JSON within [`TERMINATION_MESSAGE_LIMIT`] bytes: the
    /// stderr tail shrinks first, then the usage list, then the GPU summary.
    #[must_use]
    pub fn to_message(&self) -> String {
        let mut summary = self.clone();
        loop {
            let text = serde_json::to_string(&summary).unwrap_or_default();
            if text.len() <= TERMINATION_MESSAGE_LIMIT {
                return text;
            }
            if let Some(tail) = summary
                .outcome
                .stderr_tail
                .as_mut()
                .filter(|t| t.len() > 64)
            {
                let mut cut = tail.len() / 2;
                while !tail.is_char_boundary(cut) {
                    cut += 1;
                }
                tail.drain(..cut);
                continue;
            }
            let shrunk = summary.outcome.stderr_tail.take().is_some()
                || summary.usage.pop().is_some()
                || summary.outcome.gpu.take().is_some();
            if !shrunk {
                return text;
            }
        }
    }

    /// Reads a termination message; `None` when it is not a runner summary (a user
    /// image that writes its own message, or an old runner).
    #[must_use]
    pub fn from_message(message: &str) -> Option<Self> {
        serde_json::from_str::<Self>(message.trim())
            .ok()
            .filter(|s| s.v == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_have_a_flat_tagged_shape() {
        let report = Report {
            sequence: 3,
            sent_at: "2026-11-29T23:00:00Z".into(),
            body: ReportBody::Progress(Progress {
                percent: 40.0,
                message: Some("epoch 2/5".into()),
            }),
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"sequence": 3, "sent_at": "2026-11-29T23:00:00Z",
                "kind": "progress", "percent": 40.0, "message": "epoch 2/5"})
        );
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let report: Report = serde_json::from_str(
            r#"{"sequence":1,"sent_at":"x","kind":"heartbeat","uptime_seconds":2.5,"future":true}"#,
        )
        .unwrap();
        assert!(
            matches!(report.body, ReportBody::Heartbeat(h) if (h.uptime_seconds - 2.5).abs() < 1e-9)
        );
    }

    #[test]
    fn termination_message_fits_the_limit() {
        let summary = TerminationSummary {
            v: 1,
            outcome: Outcome {
                exit_code: 1,
                failure_class: Some(FailureClass::CudaOom),
                stderr_tail: Some("é".repeat(5000)),
                ..Outcome::default()
            },
            usage: vec![
                Usage {
                    model: "m".repeat(3000),
                    ..Usage::default()
                };
                3
            ],
            ..TerminationSummary::default()
        };
        let message = summary.to_message();
        assert!(
            message.len() <= TERMINATION_MESSAGE_LIMIT,
            "{}",
            message.len()
        );
        let back = TerminationSummary::from_message(&message).unwrap();
        assert_eq!(back.outcome.failure_class, Some(FailureClass::CudaOom));
        assert_eq!(back.outcome.exit_code, 1);
        assert!(TerminationSummary::from_message("killed by user script").is_none());
    }

    #[test]
    fn outcomes_stay_flat_on_the_wire() {
        let finished = Report {
            sequence: 9,
            sent_at: "t".into(),
            body: ReportBody::Finished(Finished {
                outcome: Outcome {
                    exit_code: 137,
                    signal: Some(9),
                    failure_class: Some(FailureClass::HostOom),
                    ..Outcome::default()
                },
                max_rss_bytes: Some(1024),
                cpu_seconds: None,
            }),
        };
        let json = serde_json::to_value(&finished).unwrap();
        assert_eq!(json["kind"], "finished");
        assert_eq!(json["exit_code"], 137);
        assert_eq!(json["failure_class"], "host_oom");
        assert_eq!(json["max_rss_bytes"], 1024);
        assert_eq!(serde_json::from_value::<Report>(json).unwrap(), finished);
        let summary: TerminationSummary = serde_json::from_str(
            r#"{"v":1,"exit_code":3,"failure_class":"user_error","usage":[]}"#,
        )
        .unwrap();
        assert_eq!(
            (summary.outcome.exit_code, summary.outcome.failure_class),
            (3, Some(FailureClass::UserError))
        );
    }

    #[test]
    fn failure_class_names_round_trip() {
        for class in FailureClass::ALL {
            assert_eq!(FailureClass::parse(class.as_str()), Some(class));
            assert_eq!(
                serde_json::to_value(class).unwrap(),
                serde_json::Value::String(class.as_str().into())
            );
        }
    }
}
