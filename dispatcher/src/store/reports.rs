//! The runner's reports: stored once per (task, attempt, sequence), heartbeats folded into
//! the task row (they only say "alive" and carry the latest GPU sample), and the settings
//! every replica shares.
//!
//! Invariants: resending a report changes nothing; a report of an attempt that is no
//! longer the task's current one is kept for history but never counts as the current
//! attempt's heartbeat; a replacement pod of the same attempt numbers its reports from
//! its own start ([`protocol::first_sequence`]), so its progress, usage and outcome are
//! kept beside the first pod's, and its termination summary is compared with its own
//! usage reports only;
//! - an attempt takes reports until a while after it ended ([`ReportAllowance`]), and at
//!   most so many progress and usage reports (count and bytes) and so many started and
//!   finished ones: a batch past either is refused whole, nothing of it stored.

use protocol::{Heartbeat, Report, ReportBody, TerminationSummary, Usage};
use tracing::instrument;

use super::row::{self, millis, task_columns};
use super::{During as _, Result, Store, StoreError, now_millis};
use crate::task::{Reason, Task, TaskId, TaskState};

/// The sequence number the termination summary (read from the pod status) is stored
/// under; the runner's own reports start at 1.
pub const TERMINATION_SEQUENCE: u64 = 0;
const TERMINATION_KIND: &str = "termination";

/// What a stored report says.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredBody {
    Runner(ReportBody),
    /// The runner's summary from the container's termination message.
    Termination(TerminationSummary),
}

/// One stored report.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReport {
    pub attempt: u32,
    pub sequence: u64,
    pub received_at: jiff::Timestamp,
    pub body: StoredBody,
}

/// What one task attempt's runner may report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportAllowance {
    /// Progress and usage reports stored per attempt.
    pub max_reports: u64,
    /// Their stored size (JSON bytes) per attempt.
    pub max_bytes: u64,
    /// How long after its attempt ended a runner may still report (its final flush).
    pub after_end: jiff::SignedDuration,
}

impl ReportAllowance {
    /// Started and finished reports stored per attempt: one of each per pod, and an
    /// attempt only gets a replacement pod after an eviction or a lost node.
    pub const MAX_LIFECYCLE_REPORTS: u64 = 16;
}

impl Default for ReportAllowance {
    fn default() -> Self {
        Self {
            max_reports: 10_000,
            max_bytes: 16 * 1024 * 1024,
            after_end: jiff::SignedDuration::from_mins(2),
        }
    }
}

/// Which part of its allowance a refused batch would have gone past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// Progress and usage reports, at most this many.
    Reports(u64),
    /// Their bytes, at most this many.
    Bytes(u64),
    /// Started and finished reports, at most this many.
    LifecycleReports(u64),
}

/// What became of a batch of reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Recording {
    Recorded(Box<Recorded>),
    /// No such task.
    NoTask,
    /// The attempt ended at `ended_at`, longer ago than the allowance's `after_end`, or
    /// it has not begun (`None`).
    AttemptOver {
        ended_at: Option<jiff::Timestamp>,
    },
    /// The batch would take the attempt past its allowance; nothing of it was stored.
    Exhausted(Exhausted),
}

impl Recording {
    /// What was recorded, if the batch was.
    #[must_use]
    pub fn recorded(self) -> Option<Recorded> {
        match self {
            Self::Recorded(recorded) => Some(*recorded),
            _ => None,
        }
    }
}

/// Whether `attempt` of `task` still takes reports at `now`: until `after_end` past its
/// end. An earlier attempt ended when the current one was queued (or before).
pub(super) fn attempt_open(
    task: &Task,
    attempt: u32,
    now: jiff::Timestamp,
    after_end: jiff::SignedDuration,
) -> Result<(), Option<jiff::Timestamp>> {
    let ended_at = if attempt > task.attempt {
        return Err(None);
    } else if attempt < task.attempt {
        task.timeline.queued_at.unwrap_or(task.updated_at)
    } else if task.state.is_terminal() {
        task.timeline.finished_at.unwrap_or(task.updated_at)
    } else {
        return Ok(());
    };
    if now.duration_since(ended_at) > after_end {
        Err(Some(ended_at))
    } else {
        Ok(())
    }
}

/// Adds a batch's new reports to its attempt's totals unless that goes past `allowance`;
/// which limit it would pass otherwise.
async fn count_against_allowance(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    id: TaskId,
    attempt: u32,
    added: Totals,
    allowance: &ReportAllowance,
) -> std::result::Result<Option<Exhausted>, sqlx::Error> {
    if added == Totals::default() {
        return Ok(None);
    }
    let current: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT reports, bytes, lifecycle_reports FROM attempt_report_totals \
         WHERE task_id = $1 AND attempt = $2",
    )
    .bind(id.to_string())
    .bind(attempt as i32)
    .fetch_optional(&mut **tx)
    .await?;
    let (reports, bytes, lifecycle) = current.unwrap_or_default();
    let sum = |stored: i64, new: u64| {
        u64::try_from(stored)
            .unwrap_or_default()
            .saturating_add(new)
    };
    let after = Totals {
        reports: sum(reports, added.reports),
        bytes: sum(bytes, added.bytes),
        lifecycle: sum(lifecycle, added.lifecycle),
    };
    if added.reports > 0 && after.reports > allowance.max_reports {
        return Ok(Some(Exhausted::Reports(allowance.max_reports)));
    }
    if added.bytes > 0 && after.bytes > allowance.max_bytes {
        return Ok(Some(Exhausted::Bytes(allowance.max_bytes)));
    }
    if added.lifecycle > 0 && after.lifecycle > ReportAllowance::MAX_LIFECYCLE_REPORTS {
        return Ok(Some(Exhausted::LifecycleReports(
            ReportAllowance::MAX_LIFECYCLE_REPORTS,
        )));
    }
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    // The write takes the row's lock (PostgreSQL) or the database's (SQLite's BEGIN
    // IMMEDIATE), and the guard checks again against what is stored then, so two batches
    // at once never pass the allowance together.
    let written = sqlx::query(
        "INSERT INTO attempt_report_totals (task_id, attempt, reports, bytes, lifecycle_reports) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (task_id, attempt) DO UPDATE SET \
             reports = attempt_report_totals.reports + excluded.reports, \
             bytes = attempt_report_totals.bytes + excluded.bytes, \
             lifecycle_reports = attempt_report_totals.lifecycle_reports + excluded.lifecycle_reports \
         WHERE (excluded.reports = 0 OR attempt_report_totals.reports + excluded.reports <= $6) \
           AND (excluded.bytes = 0 OR attempt_report_totals.bytes + excluded.bytes <= $7) \
           AND (excluded.lifecycle_reports = 0 \
                OR attempt_report_totals.lifecycle_reports + excluded.lifecycle_reports <= $8)",
    )
    .bind(id.to_string())
    .bind(attempt as i32)
    .bind(as_i64(added.reports))
    .bind(as_i64(added.bytes))
    .bind(as_i64(added.lifecycle))
    .bind(as_i64(allowance.max_reports))
    .bind(as_i64(allowance.max_bytes))
    .bind(as_i64(ReportAllowance::MAX_LIFECYCLE_REPORTS))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok((written == 0).then_some(Exhausted::Reports(allowance.max_reports)))
}

/// Reports new to the store, as they count against the allowance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    /// Progress and usage.
    reports: u64,
    /// Their JSON bytes.
    bytes: u64,
    /// Started and finished.
    lifecycle: u64,
}

/// What recording a batch did.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// Reports new to the store (heartbeats always count as new).
    pub accepted: u64,
    /// Reports it already had.
    pub duplicates: u64,
    /// A `started` of the task's current attempt was among the new reports.
    pub started: bool,
    /// The task as it was when the batch was recorded.
    pub task: Task,
    /// Where in the batch the reports new to the store are, in order (for the caller to
    /// count; the LLM cost of their usage is already added to the task's).
    pub new: Vec<usize>,
}

/// LLM usage a termination summary brought that no usage report had: already added to
/// the task's cost, for the caller to count.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreportedUsage {
    /// The task after the usage was added.
    pub task: Task,
    pub usage: Vec<Usage>,
}

/// The runner's latest sign of life for a task's current attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct LastHeartbeat {
    pub at: jiff::Timestamp,
    pub heartbeat: Option<Heartbeat>,
}

/// What `totals` (per model) count beyond the sum of `reported` for the same model: the
/// usage that never arrived as reports. Figures a model's reports exceed are left at 0.
fn usage_beyond(totals: &[Usage], reported: &[Usage]) -> Vec<Usage> {
    totals
        .iter()
        .filter_map(|total| {
            let (mut calls, mut input, mut output, mut cost) = (0u64, 0u64, 0u64, 0.0f64);
            for r in reported.iter().filter(|r| r.model == total.model) {
                calls = calls.saturating_add(r.calls);
                input = input.saturating_add(r.input_tokens);
                output = output.saturating_add(r.output_tokens);
                cost += billable(r.cost_usd);
            }
            let missing_cost = if total.cost_usd.is_finite() {
                (total.cost_usd - cost).max(0.0)
            } else {
                0.0
            };
            let missing = Usage {
                model: total.model.clone(),
                calls: total.calls.saturating_sub(calls),
                input_tokens: total.input_tokens.saturating_sub(input),
                output_tokens: total.output_tokens.saturating_sub(output),
                // Below a millionth of a cent is float noise between two sums.
                cost_usd: if missing_cost > 1e-8 {
                    missing_cost
                } else {
                    0.0
                },
            };
            (missing.calls > 0
                || missing.input_tokens > 0
                || missing.output_tokens > 0
                || missing.cost_usd > 0.0)
                .then_some(missing)
        })
        .collect()
}

/// The most models of a termination summary whose unreported usage counts.
const MAX_SUMMARY_MODELS: usize = 64;
/// The most unreported dollars a termination summary adds per model.
const MAX_SUMMARY_DOLLARS_PER_MODEL: f64 = 1e9;

/// The dollars of a usage report that count: a finite, positive `cost_usd` (the API
/// refuses others; a summary read from a pod is not checked).
fn billable(cost_usd: f64) -> f64 {
    if cost_usd.is_finite() && cost_usd > 0.0 {
        cost_usd
    } else {
        0.0
    }
}

/// Adds `dollars` of LLM use to task `id`; nothing to write for none.
async fn add_llm_cost(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    id: TaskId,
    dollars: f64,
) -> std::result::Result<(), sqlx::Error> {
    if dollars > 0.0 {
        let finished: Option<(String, Option<i64>)> = sqlx::query_as(
            "UPDATE tasks SET llm_cost_dollars = llm_cost_dollars + $2 WHERE id = $1 \
             RETURNING tenant, finished_at",
        )
        .bind(id.to_string())
        .bind(dollars)
        .fetch_optional(&mut **tx)
        .await?;
        // A cost reported after the finish (the runner's last report may come after it)
        // counts on the day the task finished, as its settled cost did.
        if let Some((tenant, Some(finished_at))) = finished {
            super::spend::add_daily_spend(tx, &tenant, finished_at, dollars).await?;
        }
    }
    Ok(())
}

/// A `task_reports` row to write.
struct StoredRow {
    id: TaskId,
    attempt: u32,
    sequence: u64,
    kind: &'static str,
    body: String,
    at: i64,
}

/// Writes `row` unless its (task, attempt, sequence) is already stored; how many rows
/// were written (0 or 1).
async fn insert_once(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    row: StoredRow,
) -> std::result::Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO task_reports (task_id, attempt, sequence, kind, body, received_at) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (task_id, attempt, sequence) DO NOTHING",
    )
    .bind(row.id.to_string())
    .bind(row.attempt as i32)
    .bind(row.sequence as i64)
    .bind(row.kind)
    .bind(row.body)
    .bind(row.at)
    .execute(&mut **tx)
    .await?
    .rows_affected())
}

/// Task `id` as `tx` sees it: `None` if it does not exist, an error if its row does not
/// decode.
pub(super) async fn task_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    id: TaskId,
) -> std::result::Result<Option<Result<Task>>, sqlx::Error> {
    let found = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE id = $1"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(found.as_ref().map(row::task))
}

/// The stored kind of usage reports.
const KIND_USAGE: &str = "usage";

/// The most usage reports the task view folds (over all attempts).
pub const MAX_USAGE_REPORTS_READ: usize = 20_000;

/// A `task_reports` row as read: attempt, sequence, kind, body, received at.
type ReportRow = (i32, i64, String, String, i64);

/// The reports the task view folds, and how many the current attempt stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportSummary {
    /// By attempt and sequence.
    pub reports: Vec<StoredReport>,
    /// More usage reports were stored than were read.
    pub usage_truncated: bool,
    /// Reports the current attempt stored (heartbeats are not stored).
    pub stored: u64,
    /// The bytes of its progress and usage reports.
    pub stored_bytes: u64,
}

fn stored_report(
    id: TaskId,
    (attempt, sequence, kind, body, received_at): ReportRow,
) -> Result<StoredReport> {
    let record = || format!("report {sequence} of task {id}");
    let body = if kind == TERMINATION_KIND {
        StoredBody::Termination(
            serde_json::from_str(&body)
                .map_err(|e| StoreError::corrupt(record(), e.to_string()))?,
        )
    } else {
        let report: Report = serde_json::from_str(&body)
            .map_err(|e| StoreError::corrupt(record(), e.to_string()))?;
        StoredBody::Runner(report.body)
    };
    Ok(StoredReport {
        attempt: u32::try_from(attempt)
            .map_err(|e| StoreError::corrupt(record(), e.to_string()))?,
        sequence: u64::try_from(sequence)
            .map_err(|e| StoreError::corrupt(record(), e.to_string()))?,
        received_at: row::timestamp(received_at, &record)?,
        body,
    })
}

fn kind_of(body: &ReportBody) -> &'static str {
    match body {
        ReportBody::Started(_) => "started",
        ReportBody::Heartbeat(_) => "heartbeat",
        ReportBody::Progress(_) => "progress",
        ReportBody::Usage(_) => KIND_USAGE,
        ReportBody::Finished(_) => "finished",
    }
}

impl Store {
    /// Records a batch of reports of `attempt` of task `id`. `Ok(None)` when the task does
    /// not exist. Non-heartbeat reports are inserted once per sequence number; every batch
    /// of the current attempt refreshes the task's last sign of life.
    #[instrument(level = "debug", skip_all, fields(task_id = %id, attempt, reports = reports.len()))]
    pub async fn record_reports(
        &self,
        id: TaskId,
        attempt: u32,
        reports: &[Report],
        allowance: &ReportAllowance,
    ) -> Result<Recording> {
        self.timed("record_reports", async {
            let during = || format!("recording reports of task {id} attempt {attempt}");
            let now = now_millis();
            let mut tx = self.begin_write().await.during(during)?;
            let Some(task) = task_in(&mut tx, id).await.during(during)?.transpose()? else {
                tx.rollback().await.during(during)?;
                return Ok(Recording::NoTask);
            };
            if let Err(ended_at) =
                attempt_open(&task, attempt, jiff::Timestamp::now(), allowance.after_end)
            {
                tx.rollback().await.during(during)?;
                return Ok(Recording::AttemptOver { ended_at });
            }
            let current = task.attempt == attempt;
            let mut added = Totals::default();
            let (mut accepted, mut duplicates, mut started) = (0, 0, false);
            let mut new_usage = Vec::new();
            let mut new = Vec::new();
            let mut latest_heartbeat: Option<&Heartbeat> = None;
            for (position, report) in reports.iter().enumerate() {
                if let ReportBody::Heartbeat(heartbeat) = &report.body {
                    accepted += 1;
                    latest_heartbeat = Some(heartbeat);
                    continue;
                }
                let body = serde_json::to_string(report).map_err(|e| {
                    StoreError::corrupt(format!("report of task {id}"), e.to_string())
                })?;
                let stored = StoredRow {
                    id,
                    attempt,
                    sequence: report.sequence,
                    kind: kind_of(&report.body),
                    body,
                    at: now,
                };
                let bytes = stored.body.len() as u64;
                let inserted = insert_once(&mut tx, stored).await.during(during)?;
                if inserted == 0 {
                    duplicates += 1;
                } else {
                    accepted += 1;
                    if matches!(
                        report.body,
                        ReportBody::Started(_) | ReportBody::Finished(_)
                    ) {
                        added.lifecycle += 1;
                    } else {
                        added.reports += 1;
                        added.bytes += bytes;
                    }
                    started |= current && matches!(report.body, ReportBody::Started(_));
                    if let ReportBody::Usage(usage) = &report.body {
                        new_usage.push(usage);
                    }
                    new.push(position);
                }
            }
            if let Some(exhausted) = count_against_allowance(&mut tx, id, attempt, added, allowance)
                .await
                .during(during)?
            {
                tx.rollback().await.during(during)?;
                return Ok(Recording::Exhausted(exhausted));
            }
            let llm_dollars: f64 = new_usage.iter().map(|u| billable(u.cost_usd)).sum();
            add_llm_cost(&mut tx, id, llm_dollars)
                .await
                .during(during)?;
            if current && !reports.is_empty() {
                let heartbeat = latest_heartbeat
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| {
                        StoreError::corrupt(format!("heartbeat of task {id}"), e.to_string())
                    })?;
                sqlx::query(
                    "UPDATE tasks SET last_heartbeat_at = $2, \
                     last_heartbeat = COALESCE($3, last_heartbeat), \
                     message = CASE WHEN reason = $5 AND state = $6 \
                         THEN NULL ELSE message END, \
                     reason = CASE WHEN reason = $5 AND state = $6 \
                         THEN NULL ELSE reason END \
                     WHERE id = $1 AND attempt = $4",
                )
                .bind(id.to_string())
                .bind(now)
                .bind(heartbeat)
                .bind(attempt as i32)
                // A report is a sign of life: a running task's lost heartbeat is found.
                .bind(Reason::HeartbeatLost.as_str())
                .bind(TaskState::Running.as_str())
                .execute(&mut *tx)
                .await
                .during(during)?;
            }
            tx.commit().await.during(during)?;
            Ok(Recording::Recorded(Box::new(Recorded {
                accepted,
                duplicates,
                started,
                task,
                new,
            })))
        })
        .await
    }

    /// Keeps the runner's termination summary of `attempt` (read from the pod status), once.
    ///
    /// The summary carries the attempt's LLM usage totals per model. Usage reports the
    /// runner could not deliver (the api was unreachable at the end) are missing from the
    /// task's LLM cost; the first time a summary is kept, whatever it counts beyond the
    /// stored usage reports of that attempt is added, so a task's LLM cost is complete
    /// either way and never counted twice.
    pub async fn record_termination(
        &self,
        id: TaskId,
        attempt: u32,
        summary: &TerminationSummary,
    ) -> Result<Option<UnreportedUsage>> {
        self.timed("record_termination", async {
            let during = || format!("recording the termination summary of task {id}");
            let body = serde_json::to_string(summary)
                .map_err(|e| StoreError::corrupt(format!("summary of task {id}"), e.to_string()))?;
            let mut tx = self.begin_write().await.during(during)?;
            let stored = StoredRow {
                id,
                attempt,
                sequence: TERMINATION_SEQUENCE,
                kind: TERMINATION_KIND,
                body,
                at: now_millis(),
            };
            let inserted = insert_once(&mut tx, stored).await.during(during)?;
            let mut unreported = Vec::new();
            let mut task = None;
            if inserted > 0 && !summary.usage.is_empty() {
                // Only this runner's reports: an earlier pod of the same attempt (a
                // replacement after an eviction) numbered its own below `first_sequence`.
                let bodies: Vec<(String,)> = sqlx::query_as(
                    "SELECT body FROM task_reports \
                     WHERE task_id = $1 AND attempt = $2 AND kind = $3 AND sequence >= $4",
                )
                .bind(id.to_string())
                .bind(attempt as i32)
                .bind(KIND_USAGE)
                .bind(i64::try_from(summary.first_sequence).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await
                .during(during)?;
                // A body that does not decode counts as nothing reported.
                let reported: Vec<Usage> = bodies
                    .iter()
                    .filter_map(|(body,)| serde_json::from_str::<Report>(body).ok())
                    .filter_map(|report| match report.body {
                        ReportBody::Usage(usage) => Some(usage),
                        _ => None,
                    })
                    .collect();
                unreported = usage_beyond(&summary.usage, &reported);
                // The summary comes from a file the workload can write: its figures count,
                // but never enough of them, or large enough, to make a sum infinite.
                unreported.truncate(MAX_SUMMARY_MODELS);
                for usage in &mut unreported {
                    usage.cost_usd = usage.cost_usd.min(MAX_SUMMARY_DOLLARS_PER_MODEL);
                }
                let dollars: f64 = unreported.iter().map(|u| u.cost_usd).sum();
                add_llm_cost(&mut tx, id, dollars).await.during(during)?;
                if !unreported.is_empty() {
                    task = task_in(&mut tx, id).await.during(during)?.transpose()?;
                }
            }
            tx.commit().await.during(during)?;
            Ok(task.map(|task| UnreportedUsage {
                task,
                usage: unreported,
            }))
        })
        .await
    }

    /// Every stored report of task `id` (heartbeats excluded), by attempt and sequence.
    /// Unbounded but for the per-attempt allowance: for tests and tools; the API reads
    /// [`Store::report_summary`].
    pub async fn reports(&self, id: TaskId) -> Result<Vec<StoredReport>> {
        self.timed("reports", async {
            let during = || format!("reading the reports of task {id}");
            let rows: Vec<ReportRow> = sqlx::query_as(
                "SELECT attempt, sequence, kind, body, received_at FROM task_reports \
                 WHERE task_id = $1 ORDER BY attempt, sequence",
            )
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await
            .during(during)?;
            rows.into_iter().map(|row| stored_report(id, row)).collect()
        })
        .await
    }

    /// What the task view folds for `attempt` (the current one) of task `id`: the usage
    /// reports of every attempt (at most [`MAX_USAGE_REPORTS_READ`]), the started and
    /// finished reports and termination summary of `attempt`, its latest progress, and
    /// its totals. A bounded read whatever the runner sent.
    pub async fn report_summary(&self, id: TaskId, attempt: u32) -> Result<ReportSummary> {
        self.timed("report_summary", async {
            let during = || format!("reading the report summary of task {id}");
            let mut usage: Vec<ReportRow> = sqlx::query_as(
                "SELECT attempt, sequence, kind, body, received_at FROM task_reports \
                 WHERE task_id = $1 AND kind = $2 ORDER BY attempt, sequence LIMIT $3",
            )
            .bind(id.to_string())
            .bind(KIND_USAGE)
            .bind(i64::try_from(MAX_USAGE_REPORTS_READ).unwrap_or(i64::MAX) + 1)
            .fetch_all(&self.pool)
            .await
            .during(during)?;
            let usage_truncated = usage.len() > MAX_USAGE_REPORTS_READ;
            usage.truncate(MAX_USAGE_REPORTS_READ);
            let mut rows: Vec<ReportRow> = sqlx::query_as(
                "SELECT attempt, sequence, kind, body, received_at FROM task_reports \
                 WHERE task_id = $1 AND attempt = $2 AND kind IN ($3, $4, $5) \
                 ORDER BY sequence LIMIT $6",
            )
            .bind(id.to_string())
            .bind(attempt as i32)
            .bind("started")
            .bind("finished")
            .bind(TERMINATION_KIND)
            .bind(i64::try_from(ReportAllowance::MAX_LIFECYCLE_REPORTS).unwrap_or(i64::MAX) + 1)
            .fetch_all(&self.pool)
            .await
            .during(during)?;
            let progress: Option<ReportRow> = sqlx::query_as(
                "SELECT attempt, sequence, kind, body, received_at FROM task_reports \
                 WHERE task_id = $1 AND attempt = $2 AND kind = $3 \
                 ORDER BY sequence DESC LIMIT 1",
            )
            .bind(id.to_string())
            .bind(attempt as i32)
            .bind("progress")
            .fetch_optional(&self.pool)
            .await
            .during(during)?;
            let totals: Option<(i64, i64, i64)> = sqlx::query_as(
                "SELECT reports, bytes, lifecycle_reports FROM attempt_report_totals \
                 WHERE task_id = $1 AND attempt = $2",
            )
            .bind(id.to_string())
            .bind(attempt as i32)
            .fetch_optional(&self.pool)
            .await
            .during(during)?;
            rows.extend(usage);
            rows.extend(progress);
            rows.sort_by_key(|row| (row.0, row.1));
            let reports = rows
                .into_iter()
                .map(|row| stored_report(id, row))
                .collect::<Result<Vec<_>>>()?;
            let (stored, bytes, lifecycle) = totals.unwrap_or_default();
            let count = |n: i64| u64::try_from(n).unwrap_or_default();
            Ok(ReportSummary {
                reports,
                usage_truncated,
                stored: count(stored) + count(lifecycle),
                stored_bytes: count(bytes),
            })
        })
        .await
    }

    /// The latest sign of life of the current attempt of task `id`, if there was one.
    pub async fn last_heartbeat(&self, id: TaskId) -> Result<Option<LastHeartbeat>> {
        self.timed("last_heartbeat", async {
            let during = || format!("reading the last heartbeat of task {id}");
            let found: Option<(Option<i64>, Option<String>)> =
                sqlx::query_as("SELECT last_heartbeat_at, last_heartbeat FROM tasks WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await
                    .during(during)?;
            let Some((Some(at), heartbeat)) = found else {
                return Ok(None);
            };
            let record = || format!("heartbeat of task {id}");
            Ok(Some(LastHeartbeat {
                at: row::timestamp(at, &record)?,
                heartbeat: heartbeat
                    .map(|text| serde_json::from_str(&text))
                    .transpose()
                    .map_err(|e| StoreError::corrupt(record(), e.to_string()))?,
            }))
        })
        .await
    }

    /// Running tasks whose runner has been silent since `silent_since`: no report of the
    /// current attempt after it (or, without any report, running since before it).
    pub async fn silent_running_tasks(
        &self,
        silent_since: jiff::Timestamp,
        limit: u32,
    ) -> Result<Vec<Task>> {
        self.timed("silent_running_tasks", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE state = $3 \
                 AND COALESCE(last_heartbeat_at, updated_at) < $1 ORDER BY id LIMIT $2"
            ))
            .bind(millis(silent_since))
            .bind(i64::from(limit))
            .bind(TaskState::Running.as_str())
            .fetch_all(&self.pool)
            .await
            .during(|| "listing silent running tasks".to_owned())?;
            rows.iter().map(row::task).collect()
        })
        .await
    }

    /// The shared setting `name`, created with `make()` by whichever replica asks first.
    pub async fn setting_or_create(
        &self,
        name: &str,
        make: impl FnOnce() -> String,
    ) -> Result<String> {
        let during = || format!("reading setting {name}");
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(make())
        .execute(&self.pool)
        .await
        .during(during)?;
        sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .during(during)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(model: &str, calls: u64, input: u64, output: u64, cost: f64) -> Usage {
        Usage {
            model: model.to_owned(),
            calls,
            input_tokens: input,
            output_tokens: output,
            cost_usd: cost,
        }
    }

    #[test]
    fn only_what_no_report_carried_is_added() {
        let totals = [
            usage("gpt-4o", 3, 300, 30, 0.75),
            usage("claude", 1, 10, 1, 0.5),
        ];
        let reported = [
            usage("gpt-4o", 1, 100, 10, 0.25),
            usage("gpt-4o", 1, 100, 10, 0.25),
        ];
        let missing = usage_beyond(&totals, &reported);
        assert_eq!(missing.len(), 2);
        assert_eq!(
            (
                missing[0].calls,
                missing[0].input_tokens,
                missing[0].output_tokens
            ),
            (1, 100, 10)
        );
        assert!((missing[0].cost_usd - 0.25).abs() < 1e-9);
        assert_eq!(
            missing[1], totals[1],
            "a model with no report at all counts whole"
        );
    }

    #[test]
    fn everything_reported_adds_nothing_and_excess_reports_subtract_nothing() {
        let totals = [usage("gpt-4o", 2, 200, 20, 0.5)];
        assert!(usage_beyond(&totals, &[usage("gpt-4o", 2, 200, 20, 0.5)]).is_empty());
        assert!(usage_beyond(&totals, &[usage("gpt-4o", 5, 900, 90, 9.0)]).is_empty());
        assert!(usage_beyond(&[usage("m", 0, 0, 0, f64::NAN)], &[]).is_empty());
    }
}
