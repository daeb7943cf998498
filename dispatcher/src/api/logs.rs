//! Task output: `POST /internal/v1/tasks/{id}/attempts/{attempt}/logs`, where the runner
//! ships its command's output lines (report token, like `/reports`), and
//! `GET /v1/tasks/{id}/logs`, where the task's tenant reads them as `text/plain`, once or
//! followed until the attempt ends. Also the `include=progress,logs` items of the
//! followed event stream.
//!
//! Bounds: a batch has at most [`MAX_BATCH_LINES`] lines of at most [`MAX_LINE_BYTES`]
//! (422 naming the field); an attempt keeps at most `--max-log-bytes-per-attempt`
//! ([`crate::store::LogLimits`]), which is also what one read can return; a read goes to
//! the store a page of [`PAGE`] lines at a time, holding no connection between pages
//! (nor while a follow waits for new lines).

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use protocol::{LogBatch, LogReceipt};
use serde::{Deserialize, Serialize};

use super::auth::Authenticated;
use super::event_feed::{EventSubscription, OutputFollow};
use super::extract::{JsonBody, QueryParams, TaskIdPath};
use super::reports::ReportingAttempt;
use super::streams::StreamSlot;
use super::{ApiError, AppState};
use crate::store::{LogCursor, LogRecording, NewLogLine, StoredLogLine, StoredProgress, TaskEvent};
use crate::task::TaskId;
use crate::task::submission::FieldError;

/// The most lines one batch may carry (the runner sends at most 1000).
pub const MAX_BATCH_LINES: usize = 5000;
/// The longest line taken (the runner cuts lines at 16 KiB and adds a short marker).
pub const MAX_LINE_BYTES: usize = 32 * 1024;
/// The longest `time` (an RFC 3339 time is about 30 bytes).
const MAX_TIME_BYTES: usize = 64;
/// The most lines `tail` may ask for.
pub const MAX_TAIL: u32 = 10_000;
/// Lines read from the store at a time.
pub const PAGE: u32 = 1000;

fn check_batch(batch: &LogBatch) -> Result<Vec<NewLogLine>, FieldError> {
    if batch.lines.len() > MAX_BATCH_LINES {
        return Err(FieldError::new(
            "lines",
            format!("must have at most {MAX_BATCH_LINES} entries"),
        ));
    }
    batch
        .lines
        .iter()
        .enumerate()
        .map(|(index, line)| {
            let field = |name: &str| format!("lines[{index}].{name}");
            if line.sequence == 0 || line.sequence > i64::MAX as u64 {
                return Err(FieldError::new(
                    field("sequence"),
                    "must be between 1 and 2^63-1",
                ));
            }
            if line.line.len() > MAX_LINE_BYTES {
                return Err(FieldError::new(
                    field("line"),
                    format!("must be at most {MAX_LINE_BYTES} bytes"),
                ));
            }
            let at = (line.time.len() <= MAX_TIME_BYTES)
                .then(|| line.time.parse::<jiff::Timestamp>().ok())
                .flatten()
                .ok_or_else(|| FieldError::new(field("time"), "must be an RFC 3339 time"))?;
            Ok(NewLogLine {
                sequence: line.sequence,
                stream: line.stream,
                at,
                line: line.line.clone(),
            })
        })
        .collect()
}

/// Takes a batch of the task's output lines from its runner.
#[utoipa::path(
    post,
    path = "/internal/v1/tasks/{id}/attempts/{attempt}/logs",
    operation_id = "postLogs",
    params(("id" = String, Path, description = "Task id"), ("attempt" = u32, Path, description = "Attempt number")),
    request_body = LogBatch,
    security(("report_token" = [])),
    responses(
        (status = 200, body = LogReceipt, description = "Stored (or already stored, or past the cap: `capped`)"),
        (status = 400, body = super::error::ErrorBody, description = "Malformed JSON"),
        (status = 401, body = super::error::ErrorBody, description = "No token, a forged or expired one"),
        (status = 403, body = super::error::ErrorBody, description = "The token belongs to another task or attempt"),
        (status = 404, body = super::error::ErrorBody, description = "No such task"),
        (status = 409, body = super::error::ErrorBody, description = "The attempt ended (longer ago than its final reports may take)"),
        (status = 413, body = super::error::ErrorBody, description = "The body is larger than the dispatcher takes"),
        (status = 422, body = super::error::ErrorBody, description = "A line breaks a rule"),
        (status = 503, body = super::error::ErrorBody, description = "The database is unavailable"),
    ),
    tag = "internal"
)]
pub async fn receive(
    State(state): State<AppState>,
    ReportingAttempt { id, attempt }: ReportingAttempt,
    JsonBody(batch): JsonBody<LogBatch>,
) -> Result<Json<LogReceipt>, ApiError> {
    let lines = check_batch(&batch)?;
    let limits = state.reports.logs();
    match state
        .store()
        .record_logs(id, attempt, &lines, &limits)
        .await?
    {
        LogRecording::Recorded(recorded) => {
            state
                .metrics()
                .reports()
                .log_lines(recorded.accepted, recorded.refused);
            Ok(Json(LogReceipt {
                accepted: recorded.accepted,
                duplicates: recorded.duplicates,
                capped: recorded.capped,
            }))
        }
        LogRecording::NoTask => Err(ApiError::NotFound),
        LogRecording::AttemptOver { ended_at: Some(at) } => Err(ApiError::AttemptOver(format!(
            "attempt {attempt} of task {id} ended at {at}; its output is no longer taken"
        ))),
        LogRecording::AttemptOver { ended_at: None } => Err(ApiError::AttemptOver(format!(
            "task {id} has no attempt {attempt}"
        ))),
    }
}

/// The query of `GET /v1/tasks/{id}/logs`. Values are read as text and checked here, so
/// a bad one is a 422 naming its parameter.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// The attempt whose output to read (default: the task's latest).
    #[param(value_type = Option<u32>, minimum = 1)]
    pub attempt: Option<String>,
    /// Only the last N lines (1 to 10000).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    pub tail: Option<String>,
    /// Only lines at or after this time (RFC 3339 with seconds and an offset, e.g.
    /// `2026-01-02T15:04:05Z`).
    // Its format and pattern: `openapi::query_rules`.
    #[param(value_type = Option<String>)]
    pub since: Option<String>,
    /// Prefix each line with its time (RFC 3339) and stream: `<time> <stdout|stderr> `.
    #[param(value_type = Option<bool>)]
    pub timestamps: Option<String>,
    /// Keep the response open, sending new lines as they are stored, until the attempt
    /// has ended and every line was sent.
    #[param(value_type = Option<bool>)]
    pub follow: Option<String>,
}

/// A checked [`LogsQuery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogRequest {
    pub attempt: Option<u32>,
    pub tail: Option<u32>,
    pub since: Option<jiff::Timestamp>,
    pub timestamps: bool,
    pub follow: bool,
}

fn flag(name: &str, value: Option<&str>) -> Result<bool, FieldError> {
    match value {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(FieldError::new(name, "must be true or false")),
    }
}

/// What `since` takes, as the OpenAPI document states it (with `format: date-time`): an
/// RFC 3339 time with seconds, at most nine fractional digits and an offset.
pub const SINCE_PATTERN: &str = "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$";

/// Whether `value` has the shape of [`SINCE_PATTERN`] (checked by hand: the pattern is
/// for readers of the document; the unit tests hold the two equal).
fn has_since_shape(value: &str) -> bool {
    let bytes = value.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|part| part.iter().all(u8::is_ascii_digit))
    };
    let fixed = digits(0..4)
        && bytes.get(4) == Some(&b'-')
        && digits(5..7)
        && bytes.get(7) == Some(&b'-')
        && digits(8..10)
        && matches!(bytes.get(10), Some(b'T' | b't'))
        && digits(11..13)
        && bytes.get(13) == Some(&b':')
        && digits(14..16)
        && bytes.get(16) == Some(&b':')
        && digits(17..19);
    if !fixed {
        return false;
    }
    let mut rest = &bytes[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let count = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=9).contains(&count) {
            return false;
        }
        rest = &fraction[count..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit()),
        _ => false,
    }
}

/// `since` as a time: an RFC 3339 time of [`SINCE_PATTERN`]'s shape that names a real
/// date, time and offset (hours below 24, minutes below 60; a leap second counts as the
/// second before it). One beyond the range of times (year 9999 at a negative offset) is
/// the latest time: no line is that late.
fn parse_since(value: &str) -> Result<jiff::Timestamp, FieldError> {
    let invalid = || {
        FieldError::new(
            "since",
            "must be an RFC 3339 time with seconds and an offset, e.g. 2026-01-02T15:04:05Z",
        )
    };
    if !has_since_shape(value) {
        return Err(invalid());
    }
    let (civil, offset) =
        value.split_at(value.len() - if value.ends_with(['Z', 'z']) { 1 } else { 6 });
    let offset = match offset.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign, h1, h2, b':', m1, m2] => {
            let hours = i32::from(h1 - b'0') * 10 + i32::from(h2 - b'0');
            let minutes = i32::from(m1 - b'0') * 10 + i32::from(m2 - b'0');
            if hours > 23 || minutes > 59 {
                return Err(invalid());
            }
            let seconds = (hours * 60 + minutes) * 60;
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return Err(invalid()),
    };
    // jiff reads a leap second (`:60`) as `:59`, as RFC 3339 readers may.
    let civil: jiff::civil::DateTime = civil.parse().map_err(|_| invalid())?;
    let offset = jiff::tz::Offset::from_seconds(offset).map_err(|_| invalid())?;
    Ok(offset
        .to_timestamp(civil)
        .unwrap_or(if offset.seconds() < 0 {
            jiff::Timestamp::MAX
        } else {
            jiff::Timestamp::MIN
        }))
}

impl LogsQuery {
    /// The request, or the parameter that breaks its rule.
    pub fn check(&self) -> Result<LogRequest, FieldError> {
        let attempt = self
            .attempt
            .as_deref()
            .map(|value| {
                value
                    .parse::<u32>()
                    .ok()
                    .filter(|a| *a >= 1)
                    .ok_or_else(|| FieldError::new("attempt", "must be a whole number >= 1"))
            })
            .transpose()?;
        let tail = self
            .tail
            .as_deref()
            .map(|value| {
                value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_TAIL).contains(n))
                    .ok_or_else(|| {
                        FieldError::new(
                            "tail",
                            format!("must be a whole number from 1 to {MAX_TAIL}"),
                        )
                    })
            })
            .transpose()?;
        let since = self.since.as_deref().map(parse_since).transpose()?;
        Ok(LogRequest {
            attempt,
            tail,
            since,
            timestamps: flag("timestamps", self.timestamps.as_deref())?,
            follow: flag("follow", self.follow.as_deref())?,
        })
    }
}

/// One line of the answer: as the task wrote it, or with its time and stream first.
#[must_use]
pub fn format_line(line: &StoredLogLine, timestamps: bool) -> String {
    if timestamps {
        format!("{} {} {}\n", line.at, line.stream.as_str(), line.line)
    } else {
        format!("{}\n", line.line)
    }
}

/// Whether `event` says `attempt` is over: a later attempt began, or the task ended.
fn event_ends_attempt(event: &TaskEvent, attempt: u32) -> bool {
    event.attempt > attempt || event.to.is_terminal()
}

/// The task's output, `text/plain`, in the order the runner read it.
#[utoipa::path(get, path = "/v1/tasks/{id}/logs", tag = "tasks", operation_id = "getTaskLogs",
    params(("id" = String, Path, description = "Task id"), LogsQuery),
    responses(
        (status = 200, description = "One line per output line, `\\n`-terminated; empty before the attempt wrote any. With follow=true the response stays open until the attempt ended and every line was sent (or --max-stream-duration, 1 h by default, passed: read on with `since`).", body = String, content_type = "text/plain"),
        (status = 401, body = super::error::ErrorBody, description = "No key, or a key that is not valid"),
        (status = 403, body = super::error::ErrorBody, description = "The tenant is disabled"),
        (status = 404, body = super::error::ErrorBody, description = "No such task (another tenant's is the same answer)"),
        (status = 409, body = super::error::ErrorBody, description = "The attempt has not begun (yet): it is beyond the task's latest (code `attempt_not_started`, field `attempt`)"),
        (status = 422, body = super::error::ErrorBody, description = "A query parameter breaks its rule (named in `field`)"),
        (status = 429, body = super::error::ErrorBody, description = "With follow=true: the tenant already follows --max-streams-per-tenant streams in this process (code `too_many_streams`, with `Retry-After`)"),
        (status = 503, body = super::error::ErrorBody, description = "The database is unavailable"),
    ),
    security(("bearer" = [])))]
pub async fn read(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    TaskIdPath(id): TaskIdPath,
    QueryParams(query): QueryParams<LogsQuery>,
) -> Result<Response, ApiError> {
    let request = query.check()?;
    let task = state
        .store()
        .get_task(&tenant.name, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let attempt = match request.attempt {
        // A valid request that may succeed later: the attempt has not begun yet.
        Some(a) if a > task.attempt => {
            return Err(ApiError::Conflict {
                code: "attempt_not_started",
                error: FieldError::new(
                    "attempt",
                    format!("task {id} has {} attempts so far", task.attempt),
                ),
            });
        }
        Some(a) => a,
        None => task.attempt,
    };
    let mut first = VecDeque::new();
    let mut cursor = LogCursor {
        after: None,
        since: request.since,
    };
    if let Some(count) = request.tail {
        let lines = state
            .store()
            .log_tail(id, attempt, request.since, count)
            .await?;
        if let Some(last) = lines.last() {
            cursor.after = Some((attempt, last.sequence));
        }
        first.extend(lines);
    }
    let slot = if request.follow {
        Some(state.streams.open(&tenant.name)?)
    } else {
        None
    };
    // The attempt's end comes from the process's shared event poller: a follow reads
    // only its lines itself.
    let ends = slot.as_ref().map(|_| state.event_feed.subscribe(id, None));
    // And whether there is anything new to read: a follow reads the store only when the
    // task's output mark moved.
    let output = slot.as_ref().map(|_| state.event_feed.follow_output(id));
    let read = LogRead {
        slot,
        ends,
        output,
        ended: false,
        state,
        id,
        attempt,
        cursor,
        request,
        pending: first,
        tail_only: request.tail.is_some() && !request.follow,
        done: false,
    };
    let body = Body::from_stream(log_stream(read));
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

struct LogRead {
    /// A followed read's place among its tenant's streams, and when it ends at the latest.
    slot: Option<StreamSlot>,
    /// A follow's events of the task, which say when the attempt is over.
    ends: Option<EventSubscription>,
    /// A follow's view of the task's output mark: whether a read can find new lines.
    output: Option<OutputFollow>,
    /// Whether an event said the attempt is over (a later attempt began, or the task
    /// ended).
    ended: bool,
    state: AppState,
    id: TaskId,
    attempt: u32,
    cursor: LogCursor,
    request: LogRequest,
    pending: VecDeque<StoredLogLine>,
    /// A plain `tail`: the lines read up front are the whole answer.
    tail_only: bool,
    done: bool,
}

/// Pages of lines as text. Without follow: until a page comes back short. With follow:
/// the attempt's state is read before each page, and once it had ended before a page
/// that came back short, every line was sent.
fn log_stream(read: LogRead) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    futures::stream::unfold(read, |mut read| async move {
        loop {
            if !read.pending.is_empty() {
                let mut text = String::new();
                while let Some(line) = read.pending.pop_front() {
                    text.push_str(&format_line(&line, read.request.timestamps));
                }
                return Some((Ok(Bytes::from(text)), read));
            }
            if read.done || read.tail_only {
                return None;
            }
            if read.slot.as_ref().is_some_and(StreamSlot::expired) {
                // Past --max-stream-duration: the client reconnects for the rest.
                return None;
            }
            // The attempt's end before the lines: lines stored before it ended are then
            // certainly in the read below.
            let ended = match &mut read.ends {
                Some(ends) => {
                    match ends.take().await {
                        Ok(events) => {
                            let attempt = read.attempt;
                            read.ended |= events
                                .iter()
                                .any(|event| event_ends_attempt(event, attempt));
                        }
                        Err(error) => {
                            tracing::warn!(task_id = %read.id, error = %error, "logs: reading the task's events failed");
                        }
                    }
                    read.ended
                }
                None => true,
            };
            // Once the attempt is over every read counts (the last one must come back
            // short); before, a follow reads only when the output mark moved.
            let worth = ended || read.output.as_mut().is_none_or(OutputFollow::worth_reading);
            if worth {
                match read
                    .state
                    .store()
                    .log_lines(read.id, read.attempt, read.cursor, PAGE)
                    .await
                {
                    Ok(lines) => {
                        if let Some(last) = lines.last() {
                            read.cursor.after = Some((read.attempt, last.sequence));
                        }
                        let full = lines.len() >= PAGE as usize;
                        if full && let Some(output) = &mut read.output {
                            output.read_again();
                        }
                        read.done = ended && !full;
                        read.pending.extend(lines);
                    }
                    Err(error) => {
                        tracing::warn!(task_id = %read.id, error = %error, "logs: reading lines failed");
                        // A plain read ends (the body stops short); a follow tries again.
                        read.done = !read.request.follow;
                        if let Some(output) = &mut read.output {
                            output.read_again();
                        }
                    }
                }
            }
            if read.pending.is_empty() && !read.done {
                let poll = read.state.follow_poll;
                match &mut read.ends {
                    Some(ends) => ends.wait(poll).await,
                    None => tokio::time::sleep(poll).await,
                }
            }
        }
    })
}

/// What the followed event stream includes besides state events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Include {
    pub progress: bool,
    pub logs: bool,
}

impl Include {
    /// Whether anything besides state events is included.
    #[must_use]
    pub fn any(self) -> bool {
        self.progress || self.logs
    }

    /// The values `include` takes, as the OpenAPI document lists them.
    pub const VALUES: [&'static str; 4] = ["progress", "logs", "progress,logs", "logs,progress"];

    /// One of [`Self::VALUES`].
    pub fn parse(value: Option<&str>) -> Result<Self, FieldError> {
        let (progress, logs) = match value {
            None => (false, false),
            Some("progress") => (true, false),
            Some("logs") => (false, true),
            Some("progress,logs" | "logs,progress") => (true, true),
            Some(_) => {
                return Err(FieldError::new(
                    "include",
                    "must be progress, logs, or both separated by a comma",
                ));
            }
        };
        Ok(Self { progress, logs })
    }
}

/// `event: log` of the followed event stream.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LogEventView {
    pub attempt: u32,
    pub stream: protocol::LogStream,
    /// RFC 3339.
    pub time: String,
    pub line: String,
}

impl From<StoredLogLine> for LogEventView {
    fn from(line: StoredLogLine) -> Self {
        Self {
            attempt: line.attempt,
            stream: line.stream,
            time: line.at.to_string(),
            line: line.line,
        }
    }
}

/// `event: progress` of the followed event stream.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ProgressEventView {
    pub attempt: u32,
    pub percent: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339.
    pub time: String,
}

impl From<StoredProgress> for ProgressEventView {
    fn from(progress: StoredProgress) -> Self {
        Self {
            attempt: progress.attempt,
            percent: progress.percent,
            message: progress.message,
            time: progress.at,
        }
    }
}

#[cfg(test)]
mod tests {
    use protocol::{LogBatch, LogLine, LogStream};

    use super::*;

    fn line(sequence: u64, time: &str, text: &str) -> LogLine {
        LogLine {
            sequence,
            stream: LogStream::Stdout,
            time: time.to_owned(),
            line: text.to_owned(),
        }
    }

    #[test]
    fn bad_lines_name_their_field() {
        let field = |lines: Vec<LogLine>| {
            check_batch(&LogBatch { lines })
                .map(|_| ())
                .map_err(|e| e.field)
        };
        let t = "2026-12-02T10:00:00Z";
        assert_eq!(field(vec![line(1, t, "ok")]), Ok(()));
        assert_eq!(
            field(vec![line(0, t, "x")]),
            Err("lines[0].sequence".into())
        );
        assert_eq!(
            field(vec![line(1, t, "ok"), line(2, "yesterday", "x")]),
            Err("lines[1].time".into())
        );
        assert_eq!(
            field(vec![line(1, t, &"x".repeat(MAX_LINE_BYTES + 1))]),
            Err("lines[0].line".into())
        );
        assert_eq!(
            field(vec![line(1, t, ""); MAX_BATCH_LINES + 1]),
            Err("lines".into())
        );
    }

    fn query(pairs: &[(&str, &str)]) -> Result<LogRequest, String> {
        let mut q = LogsQuery::default();
        for (k, v) in pairs {
            let v = Some((*v).to_owned());
            match *k {
                "attempt" => q.attempt = v,
                "tail" => q.tail = v,
                "since" => q.since = v,
                "timestamps" => q.timestamps = v,
                "follow" => q.follow = v,
                _ => unreachable!(),
            }
        }
        q.check().map_err(|e| e.field)
    }

    #[test]
    fn bad_query_values_name_their_parameter() {
        assert!(query(&[]).is_ok());
        let ok = query(&[
            ("attempt", "2"),
            ("tail", "10000"),
            ("since", "2026-12-02T10:00:00Z"),
            ("timestamps", "true"),
            ("follow", "false"),
        ])
        .unwrap();
        assert_eq!(
            (ok.attempt, ok.tail, ok.timestamps, ok.follow),
            (Some(2), Some(10_000), true, false)
        );
        for (name, value) in [
            ("attempt", "0"),
            ("attempt", "-1"),
            ("attempt", "x"),
            ("tail", "0"),
            ("tail", "10001"),
            ("tail", "ten"),
            ("since", "yesterday"),
            ("since", "2026-12-02"),
            ("timestamps", "yes"),
            ("timestamps", "1"),
            ("timestamps", ""),
            ("follow", "2"),
            ("follow", "0"),
        ] {
            assert_eq!(
                query(&[(name, value)]),
                Err(name.to_owned()),
                "{name}={value}"
            );
        }
    }

    #[test]
    fn include_takes_progress_and_logs_only() {
        assert_eq!(Include::parse(None), Ok(Include::default()));
        for value in Include::VALUES {
            let include = Include::parse(Some(value)).unwrap();
            assert_eq!(
                (include.progress, include.logs),
                (value.contains("progress"), value.contains("logs")),
                "{value}"
            );
        }
        for value in [
            "stdout",
            "",
            "logs, progress",
            "logs,",
            ",logs",
            "logs,logs",
            "progress,logs,progress",
            "__main__",
        ] {
            assert_eq!(
                Include::parse(Some(value)).unwrap_err().field,
                "include",
                "{value:?}"
            );
        }
    }

    #[test]
    fn since_takes_what_its_pattern_states() {
        let pattern = regex::Regex::new(SINCE_PATTERN).unwrap();
        let cases = [
            ("2026-12-02T10:00:00Z", true),
            ("2026-12-02t10:00:00z", true),
            ("2026-12-02T10:00:00.5+05:30", true),
            ("2026-12-02T10:00:00.123456789-00:00", true),
            ("2026-12-31T23:59:60Z", true),
            ("0000-01-01T00:00:00+23:59", true),
            ("9999-12-31T23:59:59-23:59", true),
            ("2026-12-02T10:00:00.1234567891Z", false),
            ("2026-12-02T10:00Z", false),
            ("2026-12-02 10:00:00Z", false),
            ("2026-12-02T10:00:00+0530", false),
            ("2026-12-02T10:00:00", false),
            ("2026-12-02T10:00:00.Z", false),
            ("2026-12-02", false),
            ("", false),
            ("yesterday", false),
            ("\u{663}026-12-02T10:00:00Z", false),
        ];
        for (value, shaped) in cases {
            assert_eq!(pattern.is_match(value), shaped, "pattern: {value}");
            assert_eq!(super::has_since_shape(value), shaped, "shape: {value}");
            assert_eq!(query(&[("since", value)]).is_ok(), shaped, "parse: {value}");
        }
        // Shaped, but no such date, hour or offset.
        for value in [
            "2026-02-30T10:00:00Z",
            "2026-12-02T24:00:00Z",
            "2026-12-02T10:00:00+24:00",
            "2026-12-02T10:00:00+05:60",
        ] {
            assert!(pattern.is_match(value));
            assert_eq!(
                query(&[("since", value)]),
                Err("since".to_owned()),
                "{value}"
            );
        }
        let at = |value| super::parse_since(value).unwrap();
        assert_eq!(
            at("2026-12-02T10:00:00.5+05:30").to_string(),
            "2026-12-02T04:30:00.5Z"
        );
        assert_eq!(at("9999-12-31T23:59:59-23:59"), jiff::Timestamp::MAX);
        assert_eq!(
            at("2026-12-31T23:59:60Z").to_string(),
            "2026-12-31T23:59:59Z"
        );
    }

    #[test]
    fn lines_come_plain_or_with_time_and_stream() {
        let stored = StoredLogLine {
            attempt: 1,
            sequence: 7,
            stream: LogStream::Stderr,
            at: "2026-12-02T10:00:00.5Z".parse().unwrap(),
            line: "boom".into(),
        };
        assert_eq!(format_line(&stored, false), "boom\n");
        assert_eq!(
            format_line(&stored, true),
            "2026-12-02T10:00:00.5Z stderr boom\n"
        );
    }
}
