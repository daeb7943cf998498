//! Where the time of a task goes: its stage times from the dispatcher's own records (the
//! task row's `created_at` and the `task_events` of each state move, unix ms) joined with
//! the bench's clocks (request sent, answer read, Job seen by a watch), and the mean of
//! each operation from the difference of two scrapes of the Prometheus histograms (store
//! operations, queue operations, Kubernetes requests), for the stages no row records.

use std::collections::{BTreeMap, HashMap};

use sqlx::Connection as _;

use crate::harness::Seen;
use crate::load::{Accepted, percentile};

/// The recorded times of one task, unix ms.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Recorded {
    /// When the API handler made the task (before its insert).
    pub(crate) created: Option<f64>,
    /// The `queued → launching` event: the launcher's claim committed (time taken just
    /// before its transaction).
    pub(crate) claimed: Option<f64>,
    /// The `launching → launched` event: the create was answered (time taken just before
    /// the transaction that records it).
    pub(crate) launched: Option<f64>,
}

/// Reads the recorded times of every task in the PostgreSQL or SQLite store at `url`.
pub(crate) async fn recorded(url: &str) -> anyhow::Result<HashMap<String, Recorded>> {
    sqlx::any::install_default_drivers();
    let mut connection = sqlx::AnyConnection::connect(url).await?;
    let rows: Vec<(String, i64, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT t.id, t.created_at, \
         (SELECT MIN(e.at) FROM task_events e WHERE e.task_id = t.id AND e.to_state = 'launching'), \
         (SELECT MIN(e.at) FROM task_events e WHERE e.task_id = t.id AND e.to_state = 'launched') \
         FROM tasks t",
    )
    .fetch_all(&mut connection)
    .await?;
    connection.close().await?;
    Ok(rows
        .into_iter()
        .map(|(id, created, claimed, launched)| {
            let recorded = Recorded {
                created: Some(created as f64),
                claimed: claimed.map(|v| v as f64),
                launched: launched.map(|v| v as f64),
            };
            (id, recorded)
        })
        .collect())
}

/// The stages of the breakdown, in order: each is the time from the request's send to
/// the moment it names.
pub(crate) const STAGES: [&str; 5] = [
    "HTTP accepted (201 read)",
    "task made in the handler (created_at)",
    "claimed (queued→launching event)",
    "create answered (launching→launched event)",
    "Job seen by watch",
];

/// p50 and p99 of each stage (ms after the send), by stage, over the tasks that reached it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Breakdown {
    pub(crate) p50: Vec<f64>,
    pub(crate) p99: Vec<f64>,
}

impl Breakdown {
    pub(crate) fn of(
        accepted: &[Accepted],
        recorded: &HashMap<String, Recorded>,
        seen: &Seen,
    ) -> Self {
        let mut columns: Vec<Vec<f64>> = vec![Vec::new(); STAGES.len()];
        for task in accepted {
            let row = recorded.get(&task.id).copied().unwrap_or_default();
            let times = [
                Some(task.answered_ms),
                row.created,
                row.claimed,
                row.launched,
                seen.at(&task.id),
            ];
            for (column, at) in columns.iter_mut().zip(times) {
                if let Some(at) = at {
                    column.push(at - task.sent_ms);
                }
            }
        }
        Self {
            p50: columns.iter().map(|c| percentile(c, 0.5)).collect(),
            p99: columns.iter().map(|c| percentile(c, 0.99)).collect(),
        }
    }

    /// The stage whose step from the one before holds the most of the p50 (its name and
    /// the step in ms).
    pub(crate) fn largest_step(&self) -> (&'static str, f64) {
        let mut previous = 0.0;
        let mut largest = ("none", f64::NEG_INFINITY);
        for (stage, at) in STAGES.iter().zip(&self.p50) {
            if !at.is_finite() {
                continue;
            }
            let step = at - previous;
            if step > largest.1 {
                largest = (stage, step);
            }
            previous = *at;
        }
        largest
    }
}

/// `(family, labels) → (sum, count)` of every histogram in a scrape.
pub(crate) type Histograms = BTreeMap<(String, String), (f64, f64)>;

/// Parses the `_sum` and `_count` lines of the Prometheus text format.
pub(crate) fn histograms(text: &str) -> Histograms {
    let mut out = Histograms::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let (family, is_sum) = if let Some(f) = name.strip_suffix("_sum") {
            (f, true)
        } else if let Some(f) = name.strip_suffix("_count") {
            (f, false)
        } else {
            continue;
        };
        let entry = out
            .entry((family.to_owned(), labels.to_owned()))
            .or_default();
        if is_sum {
            entry.0 = value;
        } else {
            entry.1 = value;
        }
    }
    out
}

/// The mean (ms) and count of each operation between two scrapes, for the families the
/// breakdown cannot take from rows: store operations, queue operations, Kubernetes
/// requests. Rows: `family{labels}`, mean ms, count.
pub(crate) fn operation_means(before: &Histograms, after: &Histograms) -> Vec<(String, f64, f64)> {
    const FAMILIES: [&str; 3] = [
        "agent_bus_store_query_duration_seconds",
        "agent_bus_queue_operation_duration_seconds",
        "agent_bus_kubernetes_request_duration_seconds",
    ];
    let mut rows = Vec::new();
    for ((family, labels), (sum, count)) in after {
        if !FAMILIES.contains(&family.as_str()) {
            continue;
        }
        let (sum0, count0) = before
            .get(&(family.clone(), labels.clone()))
            .copied()
            .unwrap_or_default();
        let n = count - count0;
        if n > 0.0 {
            let short = family
                .trim_start_matches("agent_bus_")
                .trim_end_matches("_duration_seconds");
            rows.push((format!("{short}{{{labels}}}"), (sum - sum0) / n * 1000.0, n));
        }
    }
    rows
}

/// The mean (ms) of one operation between two scrapes, when it ran.
pub(crate) fn mean_of(means: &[(String, f64, f64)], needle: &str) -> Option<f64> {
    means
        .iter()
        .find(|(name, _, _)| name.contains(needle))
        .map(|(_, mean, _)| *mean)
}
