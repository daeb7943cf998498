//! What a task's runner said, folded from its stored reports: a pure function, so the
//! API shows the same view whichever replica answers and however often reports were
//! resent.
//!
//! Rules: started, progress, heartbeat and outcome are those of the current attempt;
//! LLM usage adds up over every attempt (each attempt's calls were really made and paid
//! for); the runner's `finished` report wins over the termination summary read from the
//! pod status, which stands in when the reports were lost.

use std::collections::BTreeMap;

use protocol::{FailureClass, GpuDevice, GpuSample, GpuSummary, Outcome, ReportBody, Usage};
use serde::Serialize;

use crate::store::{LastHeartbeat, StoredBody, StoredReport};

/// The runner's account of a task.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RunnerView {
    /// The attempt the started/progress/heartbeat/outcome fields describe.
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner_version: Option<String>,
    /// The GPUs the runner saw through NVML (empty without GPUs or NVML).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuDevice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<String>,
    /// The latest GPU sample per GPU, from the last heartbeat.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpu_now: Vec<GpuSample>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressView>,
    /// LLM usage per model, over every attempt.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<Usage>,
    /// The sum of `usage[].cost_usd`.
    pub usage_cost_usd: f64,
    /// The usage leaves out reports past the most the view reads
    /// (`store::MAX_USAGE_REPORTS_READ`); the task's LLM cost counts them all.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub usage_truncated: bool,
    /// Reports the current attempt's runner had stored (heartbeats are not stored).
    pub reports_stored: u64,
    /// The bytes of its progress and usage reports (bounded per attempt).
    pub report_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<OutcomeView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ProgressView {
    pub percent: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the dispatcher received it, RFC 3339.
    pub at: String,
}

/// How the command ended, as the runner saw it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct OutcomeView {
    pub exit_code: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_class: Option<FailureClass>,
    pub duration_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_tail: Option<String>,
    /// `runner` (its `finished` report) or `termination_message` (the pod status).
    pub source: &'static str,
}

impl OutcomeView {
    fn new(
        outcome: &Outcome,
        max_rss_bytes: Option<u64>,
        cpu_seconds: Option<f64>,
        source: &'static str,
    ) -> Self {
        Self {
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            failure_class: outcome.failure_class,
            duration_seconds: outcome.duration_seconds,
            max_rss_bytes,
            cpu_seconds,
            gpu: outcome.gpu.clone(),
            stderr_tail: outcome.stderr_tail.clone(),
            source,
        }
    }
}

/// The view of a task in `attempt`, or `None` when its runner never said anything.
#[must_use]
pub fn runner_view(
    attempt: u32,
    reports: &[StoredReport],
    last: Option<&LastHeartbeat>,
) -> Option<RunnerView> {
    if reports.is_empty() && last.is_none() {
        return None;
    }
    let mut view = RunnerView {
        attempt,
        started_at: None,
        hostname: None,
        runner_version: None,
        gpus: Vec::new(),
        last_heartbeat_at: last.map(|l| l.at.to_string()),
        gpu_now: last
            .and_then(|l| l.heartbeat.as_ref())
            .map(|h| h.gpus.clone())
            .unwrap_or_default(),
        progress: None,
        usage: Vec::new(),
        usage_cost_usd: 0.0,
        usage_truncated: false,
        reports_stored: 0,
        report_bytes: 0,
        outcome: None,
    };
    let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
    let mut termination = None;
    for report in reports {
        let current = report.attempt == attempt;
        match &report.body {
            StoredBody::Runner(ReportBody::Usage(used)) => {
                let total = usage.entry(used.model.clone()).or_insert_with(|| Usage {
                    model: used.model.clone(),
                    ..Usage::default()
                });
                total.calls += used.calls;
                total.input_tokens += used.input_tokens;
                total.output_tokens += used.output_tokens;
                total.cost_usd += used.cost_usd;
            }
            _ if !current => {}
            StoredBody::Runner(ReportBody::Started(started)) => {
                view.started_at = Some(report.received_at.to_string());
                view.hostname.clone_from(&started.hostname);
                view.runner_version.clone_from(&started.runner_version);
                view.gpus.clone_from(&started.gpus);
            }
            StoredBody::Runner(ReportBody::Progress(progress)) => {
                view.progress = Some(ProgressView {
                    percent: progress.percent,
                    message: progress.message.clone(),
                    at: report.received_at.to_string(),
                });
            }
            StoredBody::Runner(ReportBody::Finished(finished)) => {
                view.outcome = Some(OutcomeView::new(
                    &finished.outcome,
                    finished.max_rss_bytes,
                    finished.cpu_seconds,
                    "runner",
                ));
            }
            StoredBody::Runner(ReportBody::Heartbeat(_)) => {}
            StoredBody::Termination(summary) => termination = Some(summary),
        }
    }
    if view.outcome.is_none()
        && let Some(summary) = termination
    {
        view.outcome = Some(OutcomeView::new(
            &summary.outcome,
            None,
            None,
            "termination_message",
        ));
    }
    view.usage = bounded_usage(usage);
    // A fold from +0.0: `sum()` of no floats is -0.0, which would show as "-0.0".
    view.usage_cost_usd = view.usage.iter().fold(0.0, |total, u| total + u.cost_usd);
    Some(view)
}

/// The most models the view lists; the rest are summed as one entry [`OTHER_MODELS`].
pub const MAX_MODELS_SHOWN: usize = 50;
/// The model name of that entry.
pub const OTHER_MODELS: &str = "(other models)";

/// The usage per model, the models with the highest cost first when there are more
/// than [`MAX_MODELS_SHOWN`], the rest summed into one entry; else by model name.
fn bounded_usage(usage: BTreeMap<String, Usage>) -> Vec<Usage> {
    let mut all: Vec<Usage> = usage.into_values().collect();
    if all.len() <= MAX_MODELS_SHOWN {
        return all;
    }
    all.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then(a.model.cmp(&b.model))
    });
    let rest = all.split_off(MAX_MODELS_SHOWN - 1);
    let other = rest.iter().fold(
        Usage {
            model: OTHER_MODELS.to_owned(),
            ..Usage::default()
        },
        |mut total, u| {
            total.calls = total.calls.saturating_add(u.calls);
            total.input_tokens = total.input_tokens.saturating_add(u.input_tokens);
            total.output_tokens = total.output_tokens.saturating_add(u.output_tokens);
            total.cost_usd += u.cost_usd;
            total
        },
    );
    all.push(other);
    all
}

#[cfg(test)]
mod tests {
    use protocol::{
        FailureClass, Finished, Outcome, Progress, ReportBody, Started, TerminationSummary, Usage,
    };

    use super::runner_view;
    use crate::store::{StoredBody, StoredReport};

    fn report(attempt: u32, sequence: u64, body: ReportBody) -> StoredReport {
        StoredReport {
            attempt,
            sequence,
            received_at: jiff::Timestamp::from_second(1_800_000_000 + sequence as i64).unwrap(),
            body: StoredBody::Runner(body),
        }
    }

    fn usage(model: &str, calls: u64, cost: f64) -> ReportBody {
        ReportBody::Usage(Usage {
            model: model.into(),
            calls,
            input_tokens: 100 * calls,
            output_tokens: 10 * calls,
            cost_usd: cost,
        })
    }

    #[test]
    fn usage_adds_up_over_attempts_and_the_rest_is_the_current_attempt() {
        let reports = vec![
            report(
                1,
                1,
                ReportBody::Started(Started {
                    hostname: Some("old".into()),
                    ..Started::default()
                }),
            ),
            report(1, 2, usage("gpt-4o", 2, 0.5)),
            report(
                2,
                1,
                ReportBody::Started(Started {
                    hostname: Some("new".into()),
                    ..Started::default()
                }),
            ),
            report(2, 2, usage("gpt-4o", 1, 0.25)),
            report(2, 3, usage("claude", 1, 1.0)),
            report(
                2,
                4,
                ReportBody::Progress(Progress {
                    percent: 40.0,
                    message: Some("epoch 2".into()),
                }),
            ),
            report(
                2,
                5,
                ReportBody::Progress(Progress {
                    percent: 80.0,
                    message: None,
                }),
            ),
        ];
        let view = runner_view(2, &reports, None).unwrap();
        assert_eq!(view.hostname.as_deref(), Some("new"));
        assert_eq!(view.progress.as_ref().map(|p| p.percent), Some(80.0));
        assert_eq!(view.usage.len(), 2);
        let gpt = view.usage.iter().find(|u| u.model == "gpt-4o").unwrap();
        assert_eq!((gpt.calls, gpt.input_tokens), (3, 300));
        assert!((view.usage_cost_usd - 1.75).abs() < 1e-9);
        assert!(view.outcome.is_none());
        assert!(runner_view(1, &[], None).is_none());
        let no_usage = runner_view(1, &reports[..1], None).unwrap();
        assert!(
            no_usage.usage_cost_usd.is_sign_positive(),
            "0.0, never -0.0"
        );
    }

    #[test]
    fn the_usage_list_is_bounded_and_keeps_the_costliest_models() {
        let reports: Vec<_> = (0..80_u32)
            .map(|i| {
                report(
                    1,
                    u64::from(i) + 1,
                    usage(&format!("m{i:02}"), 1, f64::from(i)),
                )
            })
            .collect();
        let view = runner_view(1, &reports, None).unwrap();
        assert_eq!(view.usage.len(), super::MAX_MODELS_SHOWN);
        assert_eq!(view.usage[0].model, "m79");
        let other = view.usage.last().unwrap();
        assert_eq!(other.model, super::OTHER_MODELS);
        assert_eq!(other.calls, 80 - 49);
        let total: f64 = (0..80).map(f64::from).sum();
        assert!((view.usage_cost_usd - total).abs() < 1e-6);
    }

    #[test]
    fn the_runner_report_wins_over_the_termination_message() {
        let summary = TerminationSummary {
            v: 1,
            outcome: Outcome {
                exit_code: 1,
                failure_class: Some(FailureClass::UserError),
                ..Outcome::default()
            },
            ..TerminationSummary::default()
        };
        let termination = StoredReport {
            attempt: 1,
            sequence: 0,
            received_at: jiff::Timestamp::from_second(1_800_000_000).unwrap(),
            body: StoredBody::Termination(summary),
        };
        let only_termination = runner_view(1, std::slice::from_ref(&termination), None).unwrap();
        let outcome = only_termination.outcome.unwrap();
        assert_eq!(
            (outcome.source, outcome.failure_class),
            ("termination_message", Some(FailureClass::UserError))
        );

        let finished = report(
            1,
            9,
            ReportBody::Finished(Finished {
                outcome: Outcome {
                    exit_code: 1,
                    failure_class: Some(FailureClass::CudaOom),
                    ..Outcome::default()
                },
                ..Finished::default()
            }),
        );
        let both = runner_view(1, &[termination, finished], None).unwrap();
        let outcome = both.outcome.unwrap();
        assert_eq!(
            (outcome.source, outcome.failure_class),
            ("runner", Some(FailureClass::CudaOom))
        );
    }
}
