//! How families are registered and described: the [`Registrar`] each concern registers
//! its families with (name, kind, label names, help, in one call), the [`Described`]
//! list behind the metrics reference of `docs/OBSERVABILITY.md`, and the histogram
//! buckets.

use std::fmt::Write as _;

use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

/// Every family's name starts with `agent_bus_`, but the standard `process_*` ones.
pub const PREFIX: &str = "agent_bus";

/// Request latencies, 1 ms to 30 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Task stages, 100 ms to a day: a stage can be a scheduling wait or a whole training run.
/// 30 s is a bucket bound because the dispatch-latency objective is "launched within 30 s".
pub const STAGE_BUCKETS: [f64; 18] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
    14400.0, 43200.0, 86400.0,
];

/// A histogram over [`LATENCY_BUCKETS`].
pub(super) fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A histogram over [`STAGE_BUCKETS`].
pub(super) fn stage_histogram() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One family as scrapers see it: full name (counters with `_total`), kind, help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub name: String,
    pub kind: Kind,
    /// Label names (histograms also have `le`).
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

/// Registers families under [`PREFIX`] and describes them, in registration order (the
/// order of the exposition and of the documentation's table).
pub(super) struct Registrar<'a> {
    registry: &'a mut Registry,
    described: Vec<Described>,
}

impl<'a> Registrar<'a> {
    pub(super) fn new(registry: &'a mut Registry) -> Self {
        Self {
            registry: registry.sub_registry_with_prefix(PREFIX),
            described: Vec::new(),
        }
    }

    /// Registers a counter family `agent_bus_{name}` (`_total` is added by the encoder).
    pub(super) fn counter(
        &mut self,
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
        metric: impl Metric,
    ) {
        self.register(name, Kind::Counter, labels, help, metric);
    }

    /// Registers a gauge family `agent_bus_{name}`.
    pub(super) fn gauge(
        &mut self,
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
        metric: impl Metric,
    ) {
        self.register(name, Kind::Gauge, labels, help, metric);
    }

    /// Registers a histogram family `agent_bus_{name}`.
    pub(super) fn histogram(
        &mut self,
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
        metric: impl Metric,
    ) {
        self.register(name, Kind::Histogram, labels, help, metric);
    }

    fn register(
        &mut self,
        name: &'static str,
        kind: Kind,
        labels: &'static [&'static str],
        help: &'static str,
        metric: impl Metric,
    ) {
        self.registry.register(name, help, metric);
        let suffix = if kind == Kind::Counter { "_total" } else { "" };
        self.described.push(Described {
            name: format!("{PREFIX}_{name}{suffix}"),
            kind,
            labels,
            help,
        });
    }

    /// Describes a standard family that a collector on the root registry writes under its
    /// own unprefixed name (`process_*`, see [`super::process`]).
    pub(super) fn describe_standard(&mut self, name: &'static str, kind: Kind, help: &'static str) {
        let suffix = if kind == Kind::Counter { "_total" } else { "" };
        self.described.push(Described {
            name: format!("{name}{suffix}"),
            kind,
            labels: &[],
            help,
        });
    }

    /// The families registered so far, in order.
    pub(super) fn into_described(self) -> Vec<Described> {
        self.described
    }
}

/// The metrics reference of `docs/OBSERVABILITY.md`: one Markdown table row per family.
#[must_use]
pub fn reference_table(described: &[Described]) -> String {
    let mut table = String::from("| Metric | Type | Labels | Meaning |\n|---|---|---|---|\n");
    for family in described {
        let labels = if family.labels.is_empty() {
            "none".to_owned()
        } else {
            family
                .labels
                .iter()
                .map(|label| format!("`{label}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            table,
            "| `{}` | {} | {} | {} |",
            family.name,
            family.kind.as_str(),
            labels,
            family.help
        );
    }
    table
}

/// The names of every family as they appear in the text (`# TYPE` lines): for the
/// documentation test.
#[must_use]
pub fn family_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            let name = words.next()?;
            let kind = words.next()?;
            Some(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            })
        })
        .collect()
}
