//! The output lines the runner ships, per task attempt: stored once per (task, attempt,
//! sequence), read back in sequence order (the order the runner read them), capped per
//! attempt and purged a retention period after the task ended. Also the progress
//! reports the event stream follows.
//!
//! Invariants:
//! - an attempt keeps at most its cap of line bytes ([`LogLimits::max_bytes`]); the
//!   first line past it is replaced by a marker line saying so (same sequence, so it
//!   sorts where the output stopped), the attempt is marked capped, and later batches
//!   store nothing and are answered `capped` (head retention: see docs/LOGS.md);
//! - the cap is separate from the report allowance: lines never count against it;
//! - lines are taken while the attempt takes reports (until `after_end` past its end);
//! - every read is bounded by its `limit`; the purge deletes at most `limit` rows a call.

use protocol::{LogLine, LogStream, Report, ReportBody};
use tracing::instrument;

use super::reports::{attempt_open, task_in};
use super::row::{self, millis};
use super::{During as _, Result, Store, StoreError, now_millis};
use crate::task::TaskId;

/// How much output a task has stored so far ([`Store::output_marks`]): it only grows
/// while the task runs, so an unchanged mark means nothing new to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputMark {
    pub lines: i64,
    pub reports: i64,
}

/// What one attempt's log may hold, and how long after the attempt it is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Bytes of line text kept per attempt.
    pub max_bytes: u64,
    /// How long after its attempt ended lines are still taken (the reports' allowance).
    pub after_end: jiff::SignedDuration,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            after_end: jiff::SignedDuration::from_mins(2),
        }
    }
}

/// What became of a batch of lines.
#[derive(Debug, Clone, PartialEq)]
pub enum LogRecording {
    Recorded(LogsRecorded),
    /// No such task.
    NoTask,
    /// The attempt ended longer ago than `after_end` (or has not begun: `None`).
    AttemptOver {
        ended_at: Option<jiff::Timestamp>,
    },
}

/// What recording a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogsRecorded {
    /// Lines new to the store.
    pub accepted: u64,
    /// Lines it already had.
    pub duplicates: u64,
    /// Lines not kept for the cap (this batch's).
    pub refused: u64,
    /// The attempt's log is at its cap: nothing more is kept.
    pub capped: bool,
}

/// A line to store: the runner's line with its time as unix milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLogLine {
    pub sequence: u64,
    pub stream: LogStream,
    pub at: jiff::Timestamp,
    pub line: String,
}

/// A stored line.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLogLine {
    pub attempt: u32,
    pub sequence: u64,
    pub stream: LogStream,
    pub at: jiff::Timestamp,
    pub line: String,
}

impl From<&StoredLogLine> for LogLine {
    fn from(line: &StoredLogLine) -> Self {
        LogLine {
            sequence: line.sequence,
            stream: line.stream,
            time: line.at.to_string(),
            line: line.line.clone(),
        }
    }
}

/// Where a read starts and what it skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogCursor {
    /// Lines after this (attempt, sequence); `None`: from the first.
    pub after: Option<(u32, u64)>,
    /// Only lines at or after this time.
    pub since: Option<jiff::Timestamp>,
}

/// A stored progress report, for the event stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredProgress {
    pub attempt: u32,
    pub sequence: u64,
    pub percent: f64,
    pub message: Option<String>,
    /// When the runner made it (its `sent_at`), else when it was stored.
    pub at: String,
}

fn stream_of(text: &str) -> Option<LogStream> {
    match text {
        "stdout" => Some(LogStream::Stdout),
        "stderr" => Some(LogStream::Stderr),
        _ => None,
    }
}

/// A `task_logs` row as read: attempt, sequence, stream, at, line.
type LogRow = (i32, i64, String, i64, String);

fn stored_line(id: TaskId, (attempt, sequence, stream, at, line): LogRow) -> Result<StoredLogLine> {
    let record = || format!("log line {sequence} of task {id}");
    Ok(StoredLogLine {
        attempt: u32::try_from(attempt)
            .map_err(|e| StoreError::corrupt(record(), e.to_string()))?,
        sequence: u64::try_from(sequence)
            .map_err(|e| StoreError::corrupt(record(), e.to_string()))?,
        stream: stream_of(&stream)
            .ok_or_else(|| StoreError::corrupt(record(), format!("unknown stream '{stream}'")))?,
        at: row::timestamp(at, &record)?,
        line,
    })
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The marker that stands for the lines past an attempt's cap.
fn cap_marker(max_bytes: u64) -> String {
    format!(
        "[agent-bus: this attempt's log reached its cap of {max_bytes} bytes (--max-log-bytes-per-attempt); later output was not kept here (the container's own log, `kubectl logs`, has it while the pod exists)]"
    )
}

impl Store {
    /// Stores a batch of lines of `attempt` of task `id`, up to the attempt's cap.
    #[instrument(level = "debug", skip_all, fields(task_id = %id, attempt, lines = lines.len()))]
    pub async fn record_logs(
        &self,
        id: TaskId,
        attempt: u32,
        lines: &[NewLogLine],
        limits: &LogLimits,
    ) -> Result<LogRecording> {
        self.timed("record_logs", async {
            let during = || format!("recording log lines of task {id} attempt {attempt}");
            let mut tx = self.begin_write().await.during(during)?;
            let Some(task) = task_in(&mut tx, id).await.during(during)?.transpose()? else {
                tx.rollback().await.during(during)?;
                return Ok(LogRecording::NoTask);
            };
            if let Err(ended_at) =
                attempt_open(&task, attempt, jiff::Timestamp::now(), limits.after_end)
            {
                tx.rollback().await.during(during)?;
                return Ok(LogRecording::AttemptOver { ended_at });
            }
            sqlx::query(
                "INSERT INTO attempt_log_totals (task_id, attempt, bytes, lines, capped_at) \
                 VALUES ($1, $2, 0, 0, NULL) ON CONFLICT (task_id, attempt) DO NOTHING",
            )
            .bind(id.to_string())
            .bind(attempt as i32)
            .execute(&mut *tx)
            .await
            .during(during)?;
            // The no-op update takes the row's lock (PostgreSQL; SQLite's BEGIN IMMEDIATE
            // already holds the database's), so two batches never pass the cap together.
            sqlx::query(
                "UPDATE attempt_log_totals SET lines = lines WHERE task_id = $1 AND attempt = $2",
            )
            .bind(id.to_string())
            .bind(attempt as i32)
            .execute(&mut *tx)
            .await
            .during(during)?;
            let (bytes, stored_lines, capped_at): (i64, i64, Option<i64>) = sqlx::query_as(
                "SELECT bytes, lines, capped_at FROM attempt_log_totals \
                 WHERE task_id = $1 AND attempt = $2",
            )
            .bind(id.to_string())
            .bind(attempt as i32)
            .fetch_one(&mut *tx)
            .await
            .during(during)?;
            if capped_at.is_some() {
                tx.rollback().await.during(during)?;
                return Ok(LogRecording::Recorded(LogsRecorded {
                    refused: lines.len() as u64,
                    capped: true,
                    ..LogsRecorded::default()
                }));
            }
            let mut bytes = u64::try_from(bytes).unwrap_or_default();
            let mut recorded = LogsRecorded::default();
            let mut added_lines = 0_u64;
            for line in lines {
                let size = line.line.len() as u64;
                let (text, stream, at, over) =
                    if recorded.capped || bytes.saturating_add(size) > limits.max_bytes {
                        (
                            cap_marker(limits.max_bytes),
                            LogStream::Stderr,
                            jiff::Timestamp::now(),
                            true,
                        )
                    } else {
                        (line.line.clone(), line.stream, line.at, false)
                    };
                if over && recorded.capped {
                    recorded.refused += 1;
                    continue;
                }
                let inserted = sqlx::query(
                    "INSERT INTO task_logs (task_id, attempt, sequence, stream, at, line) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (task_id, attempt, sequence) DO NOTHING",
                )
                .bind(id.to_string())
                .bind(attempt as i32)
                .bind(as_i64(line.sequence))
                .bind(stream.as_str())
                .bind(millis(at))
                .bind(text)
                .execute(&mut *tx)
                .await
                .during(during)?
                .rows_affected();
                if inserted == 0 {
                    // Stored by an earlier batch: its bytes already count.
                    recorded.duplicates += 1;
                } else if over {
                    recorded.refused += 1;
                    recorded.capped = true;
                } else {
                    recorded.accepted += 1;
                    added_lines += 1;
                    bytes += size;
                }
            }
            sqlx::query(
                "UPDATE attempt_log_totals SET bytes = $3, lines = $4, capped_at = $5 \
                 WHERE task_id = $1 AND attempt = $2",
            )
            .bind(id.to_string())
            .bind(attempt as i32)
            .bind(as_i64(bytes))
            .bind(stored_lines.saturating_add(as_i64(added_lines)))
            .bind(recorded.capped.then(now_millis))
            .execute(&mut *tx)
            .await
            .during(during)?;
            tx.commit().await.during(during)?;
            Ok(LogRecording::Recorded(recorded))
        })
        .await
    }

    /// The first `limit` lines of `attempt` of task `id` after `cursor`, in order.
    pub async fn log_lines(
        &self,
        id: TaskId,
        attempt: u32,
        cursor: LogCursor,
        limit: u32,
    ) -> Result<Vec<StoredLogLine>> {
        self.timed("log_lines", async {
            let after = cursor
                .after
                .filter(|(a, _)| *a == attempt)
                .map_or(-1, |(_, sequence)| as_i64(sequence));
            let rows: Vec<LogRow> = sqlx::query_as(
                "SELECT attempt, sequence, stream, at, line FROM task_logs \
                 WHERE task_id = $1 AND attempt = $2 AND sequence > $3 AND at >= $4 \
                 ORDER BY sequence LIMIT $5",
            )
            .bind(id.to_string())
            .bind(attempt as i32)
            .bind(after)
            .bind(cursor.since.map_or(i64::MIN, millis))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .during(|| format!("reading the log of task {id}"))?;
            rows.into_iter().map(|row| stored_line(id, row)).collect()
        })
        .await
    }

    /// The last `count` lines of `attempt` of task `id` at or after `since`, in order.
    pub async fn log_tail(
        &self,
        id: TaskId,
        attempt: u32,
        since: Option<jiff::Timestamp>,
        count: u32,
    ) -> Result<Vec<StoredLogLine>> {
        self.timed("log_tail", async {
            let rows: Vec<LogRow> = sqlx::query_as(
                "SELECT attempt, sequence, stream, at, line FROM task_logs \
                 WHERE task_id = $1 AND attempt = $2 AND at >= $3 \
                 ORDER BY sequence DESC LIMIT $4",
            )
            .bind(id.to_string())
            .bind(attempt as i32)
            .bind(since.map_or(i64::MIN, millis))
            .bind(i64::from(count))
            .fetch_all(&self.pool)
            .await
            .during(|| format!("reading the log tail of task {id}"))?;
            let mut lines = rows
                .into_iter()
                .map(|row| stored_line(id, row))
                .collect::<Result<Vec<_>>>()?;
            lines.reverse();
            Ok(lines)
        })
        .await
    }

    /// Each of `tasks`' output mark: its stored lines (a cap's marker counted) and its
    /// counted reports (progress among them), over all attempts, read from the per-attempt
    /// totals, never the lines. A new line or report moves the mark, so a followed stream
    /// reads its task's lines and progress only when the mark moved since its last read
    /// ([`crate::api::event_feed`]). One read per [`super::FOLLOWED_PER_READ`] tasks;
    /// tasks gone are absent.
    pub async fn output_marks(&self, tasks: &[TaskId]) -> Result<Vec<(TaskId, OutputMark)>> {
        let mut marks = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(super::FOLLOWED_PER_READ) {
            marks.extend(self.output_marks_read(chunk).await?);
        }
        Ok(marks)
    }

    async fn output_marks_read(&self, tasks: &[TaskId]) -> Result<Vec<(TaskId, OutputMark)>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        self.timed("output_marks", async {
            let placeholders: Vec<String> = (1..=tasks.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT t.id, \
                   CAST((SELECT COALESCE(SUM(l.lines), 0) + COUNT(l.capped_at) \
                         FROM attempt_log_totals l WHERE l.task_id = t.id) AS BIGINT), \
                   CAST((SELECT COALESCE(SUM(r.reports + r.lifecycle_reports), 0) \
                         FROM attempt_report_totals r WHERE r.task_id = t.id) AS BIGINT) \
                 FROM tasks t WHERE t.id IN ({})",
                placeholders.join(", ")
            );
            // Every fragment above is ours; values are only ever bound.
            let mut query = sqlx::query_as::<_, (String, i64, i64)>(sqlx::AssertSqlSafe(sql));
            for task in tasks {
                query = query.bind(task.to_string());
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .during(|| format!("reading the output marks of {} followed tasks", tasks.len()))?;
            rows.into_iter()
                .map(|(id, lines, reports)| {
                    let task = row::parse::<TaskId>(&id, "id", &|| format!("task {id}"))?;
                    Ok((task, OutputMark { lines, reports }))
                })
                .collect()
        })
        .await
    }

    /// The first `limit` lines of every attempt of task `id` after `after` (attempt,
    /// sequence), by attempt and sequence: what the event stream follows.
    pub async fn log_lines_of_task(
        &self,
        id: TaskId,
        after: Option<(u32, u64)>,
        limit: u32,
    ) -> Result<Vec<StoredLogLine>> {
        self.timed("log_lines_of_task", async {
            let (attempt, sequence) = after.map_or((0, -1), |(a, s)| (a as i32, as_i64(s)));
            let rows: Vec<LogRow> = sqlx::query_as(
                "SELECT attempt, sequence, stream, at, line FROM task_logs \
                 WHERE task_id = $1 AND (attempt > $2 OR (attempt = $2 AND sequence > $3)) \
                 ORDER BY attempt, sequence LIMIT $4",
            )
            .bind(id.to_string())
            .bind(attempt)
            .bind(sequence)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .during(|| format!("reading the log of task {id}"))?;
            rows.into_iter().map(|row| stored_line(id, row)).collect()
        })
        .await
    }

    /// The first `limit` progress reports of task `id` after `after` (attempt,
    /// sequence), by attempt and sequence.
    pub async fn progress_of_task(
        &self,
        id: TaskId,
        after: Option<(u32, u64)>,
        limit: u32,
    ) -> Result<Vec<StoredProgress>> {
        self.timed("progress_of_task", async {
            let during = || format!("reading the progress of task {id}");
            let (attempt, sequence) = after.map_or((0, -1), |(a, s)| (a as i32, as_i64(s)));
            let rows: Vec<(i32, i64, String, i64)> = sqlx::query_as(
                "SELECT attempt, sequence, body, received_at FROM task_reports \
                 WHERE task_id = $1 AND kind = $2 \
                   AND (attempt > $3 OR (attempt = $3 AND sequence > $4)) \
                 ORDER BY attempt, sequence LIMIT $5",
            )
            .bind(id.to_string())
            .bind("progress")
            .bind(attempt)
            .bind(sequence)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .during(during)?;
            let mut out = Vec::with_capacity(rows.len());
            for (attempt, sequence, body, received_at) in rows {
                let record = || format!("report {sequence} of task {id}");
                let report: Report = serde_json::from_str(&body)
                    .map_err(|e| StoreError::corrupt(record(), e.to_string()))?;
                let ReportBody::Progress(progress) = report.body else {
                    continue;
                };
                let at = if report.sent_at.is_empty() {
                    row::timestamp(received_at, &record)?.to_string()
                } else {
                    report.sent_at
                };
                out.push(StoredProgress {
                    attempt: u32::try_from(attempt)
                        .map_err(|e| StoreError::corrupt(record(), e.to_string()))?,
                    sequence: u64::try_from(sequence)
                        .map_err(|e| StoreError::corrupt(record(), e.to_string()))?,
                    percent: progress.percent,
                    message: progress.message,
                    at,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Deletes at most `limit` log lines of tasks that ended before `ended_before`, and
    /// the per-attempt totals of such tasks once their lines are gone; how many lines
    /// were deleted (fewer than `limit`: nothing more to purge for now).
    pub async fn purge_logs(&self, ended_before: jiff::Timestamp, limit: u32) -> Result<u64> {
        self.timed("purge_logs", async {
            let during = || "purging expired task logs".to_owned();
            let deleted = sqlx::query(
                "DELETE FROM task_logs WHERE (task_id, attempt, sequence) IN ( \
                     SELECT l.task_id, l.attempt, l.sequence FROM tasks t \
                     JOIN task_logs l ON l.task_id = t.id \
                     WHERE t.finished_at IS NOT NULL AND t.finished_at < $1 LIMIT $2)",
            )
            .bind(millis(ended_before))
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .during(during)?
            .rows_affected();
            if deleted < u64::from(limit) {
                sqlx::query(
                    "DELETE FROM attempt_log_totals WHERE (task_id, attempt) IN ( \
                         SELECT a.task_id, a.attempt FROM tasks t \
                         JOIN attempt_log_totals a ON a.task_id = t.id \
                         WHERE t.finished_at IS NOT NULL AND t.finished_at < $1 \
                           AND NOT EXISTS (SELECT 1 FROM task_logs l \
                               WHERE l.task_id = a.task_id AND l.attempt = a.attempt) \
                         LIMIT $2)",
                )
                .bind(millis(ended_before))
                .bind(i64::from(limit))
                .execute(&self.pool)
                .await
                .during(during)?;
            }
            Ok(deleted)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_round_trip_and_the_marker_names_the_flag() {
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            assert_eq!(stream_of(stream.as_str()), Some(stream));
        }
        assert_eq!(stream_of("stdin"), None);
        assert!(cap_marker(10).contains("cap of 10 bytes (--max-log-bytes-per-attempt)"));
    }
}
