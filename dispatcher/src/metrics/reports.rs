//! What runners report: reports stored (duplicates and heartbeats excluded) by kind, and
//! the LLM calls and tokens they carry by tenant and model. The dollars of that usage
//! count into `cost_dollars` as resource `llm`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use protocol::{ReportBody, Usage};

use super::Metrics;
use super::cost::CostResource;
use super::labels::label_values;
use super::registry::Registrar;

label_values! {
    /// The kind of a runner report.
    pub enum ReportKind {
        Started => "started",
        Heartbeat => "heartbeat",
        Progress => "progress",
        Usage => "usage",
        Finished => "finished",
    }
}

impl ReportKind {
    #[must_use]
    pub fn of(body: &ReportBody) -> Self {
        match body {
            ReportBody::Started(_) => Self::Started,
            ReportBody::Heartbeat(_) => Self::Heartbeat,
            ReportBody::Progress(_) => Self::Progress,
            ReportBody::Usage(_) => Self::Usage,
            ReportBody::Finished(_) => Self::Finished,
        }
    }
}

label_values! {
    /// Whether tokens went to the model or came from it.
    pub enum TokenDirection {
        Input => "input",
        Output => "output",
    }
}

label_values! {
    /// What became of a shipped output line.
    pub enum LogLineOutcome {
        Stored => "stored",
        Capped => "capped",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LogLineLabels {
    outcome: LogLineOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: ReportKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    tenant: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    tenant: String,
    model: String,
    direction: TokenDirection,
}

#[derive(Debug)]
pub(super) struct ReportFamilies {
    reports: Family<KindLabels, Counter>,
    llm_calls: Family<ModelLabels, Counter>,
    llm_tokens: Family<TokenLabels, Counter>,
    log_lines: Family<LogLineLabels, Counter>,
    log_lines_purged: Counter,
    tasks_purged: Counter,
}

impl ReportFamilies {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let families = Self {
            reports: Family::default(),
            llm_calls: Family::default(),
            llm_tokens: Family::default(),
            log_lines: Family::default(),
            log_lines_purged: Counter::default(),
            tasks_purged: Counter::default(),
        };
        registrar.counter(
            "runner_reports",
            &["kind"],
            "Runner reports stored (duplicates and heartbeats excluded), by kind (started, progress, usage, finished)",
            families.reports.clone(),
        );
        registrar.counter(
            "llm_calls",
            &["tenant", "model"],
            "LLM calls reported by runners, by tenant and model",
            families.llm_calls.clone(),
        );
        registrar.counter(
            "llm_tokens",
            &["tenant", "model", "direction"],
            "LLM tokens reported by runners, by tenant, model and direction (input, output)",
            families.llm_tokens.clone(),
        );
        registrar.counter(
            "task_log_lines",
            &["outcome"],
            "Task output lines runners shipped, by outcome (stored; capped: not kept, past the attempt's --max-log-bytes-per-attempt)",
            families.log_lines.clone(),
        );
        registrar.counter(
            "task_log_lines_purged",
            &[],
            "Task output lines deleted by the retention sweep (--log-retention)",
            families.log_lines_purged.clone(),
        );
        registrar.counter(
            "tasks_purged",
            &[],
            "Ended tasks deleted with their events, attempts, reports, output and webhook deliveries by the retention sweep (--task-retention)",
            families.tasks_purged.clone(),
        );
        families
    }
}

/// Records runner reports and their LLM usage. Tenant and model names are bounded here.
#[derive(Debug, Clone, Copy)]
pub struct ReportMetrics<'a> {
    pub(super) metrics: &'a Metrics,
}

impl ReportMetrics<'_> {
    /// A report newly stored.
    pub fn received(&self, kind: ReportKind) {
        self.metrics
            .inner
            .reports
            .reports
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Output lines of a batch: `stored` new ones, `capped` not kept for the cap.
    pub fn log_lines(&self, stored: u64, capped: u64) {
        let family = &self.metrics.inner.reports.log_lines;
        for (outcome, count) in [
            (LogLineOutcome::Stored, stored),
            (LogLineOutcome::Capped, capped),
        ] {
            if count > 0 {
                family
                    .get_or_create(&LogLineLabels { outcome })
                    .inc_by(count);
            }
        }
    }

    /// Output lines the retention sweep deleted.
    pub fn log_lines_purged(&self, count: u64) {
        self.metrics.inner.reports.log_lines_purged.inc_by(count);
    }

    /// Ended tasks the retention sweep deleted.
    pub fn tasks_purged(&self, count: u64) {
        self.metrics.inner.reports.tasks_purged.inc_by(count);
    }

    /// LLM usage newly reported by a task of `tenant` in `queue`: its calls, its tokens
    /// and its dollars.
    pub fn llm_usage(&self, tenant: &str, queue: &str, usage: &Usage) {
        let families = &self.metrics.inner.reports;
        let bounded_tenant = self.metrics.bounded("tenant", tenant);
        let model = self.metrics.bounded("model", &usage.model);
        families
            .llm_calls
            .get_or_create(&ModelLabels {
                tenant: bounded_tenant.clone(),
                model: model.clone(),
            })
            .inc_by(usage.calls);
        for (direction, tokens) in [
            (TokenDirection::Input, usage.input_tokens),
            (TokenDirection::Output, usage.output_tokens),
        ] {
            families
                .llm_tokens
                .get_or_create(&TokenLabels {
                    tenant: bounded_tenant.clone(),
                    model: model.clone(),
                    direction,
                })
                .inc_by(tokens);
        }
        self.metrics
            .cost(tenant, queue, CostResource::Llm, usage.cost_usd);
    }
}
