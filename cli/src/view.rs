//! How tasks, events and usage look on a terminal: the `list` table (kubectl's plain
//! columns), the `get` summary, ages and durations (`5s`, `3m12s`, `4h5m`, `2d3h`), and
//! `-o json|yaml`. Pure functions of the API's JSON and the current time.

use std::fmt::Write as _;

use comfy_table::{CellAlignment, ColumnConstraint, Table, presets};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The fields of a task view (`TaskView` of the API) the tables and summaries show;
/// unknown fields are ignored, missing ones default.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Task {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) state: String,
    pub(crate) reason: Option<String>,
    pub(crate) message: Option<String>,
    pub(crate) attempt: u32,
    pub(crate) exit_code: Option<i64>,
    pub(crate) gpu_class: Option<String>,
    pub(crate) image: String,
    pub(crate) command: Vec<String>,
    pub(crate) args: Vec<String>,
    pub(crate) queue: String,
    pub(crate) priority: i64,
    pub(crate) max_retries: u32,
    pub(crate) retries_used: u32,
    pub(crate) timeout_seconds: Option<u64>,
    pub(crate) resources: Resources,
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    pub(crate) cost: Cost,
    pub(crate) created_at: String,
    pub(crate) started_at: Option<String>,
    pub(crate) finished_at: Option<String>,
    pub(crate) next_attempt_at: Option<String>,
    pub(crate) queue_position: Option<u64>,
    pub(crate) job: Option<Job>,
    pub(crate) runner: Option<Runner>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Resources {
    pub(crate) cpu: Option<String>,
    pub(crate) memory: Option<String>,
    pub(crate) gpu: Option<GpuRequest>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct GpuRequest {
    pub(crate) class: String,
    pub(crate) count: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Cost {
    pub(crate) total_dollars: f64,
    pub(crate) settled: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Job {
    pub(crate) namespace: String,
    pub(crate) name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Runner {
    pub(crate) progress: Option<Progress>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Progress {
    pub(crate) percent: f64,
    pub(crate) message: Option<String>,
}

impl Task {
    pub(crate) fn from_value(value: &Value) -> Result<Self> {
        Self::deserialize(value).map_err(|e| Error::Protocol {
            server: "the dispatcher".to_owned(),
            detail: format!("a task view this client cannot read: {e}"),
        })
    }

    /// `a100:2`, `-` without GPUs; the class the attempt runs on when it moved.
    fn gpu(&self) -> String {
        match &self.resources.gpu {
            Some(gpu) => format!(
                "{}:{}",
                self.gpu_class.as_deref().unwrap_or(&gpu.class),
                gpu.count
            ),
            None => "-".to_owned(),
        }
    }

    /// From start to end (or now), when it started.
    fn duration(&self, now: jiff::Timestamp) -> Option<i64> {
        let started = timestamp(self.started_at.as_deref()?)?;
        let ended = self
            .finished_at
            .as_deref()
            .and_then(timestamp)
            .unwrap_or(now);
        Some((ended - started).get_seconds())
    }

    fn age(&self, now: jiff::Timestamp) -> Option<i64> {
        Some((now - timestamp(&self.created_at)?).get_seconds())
    }

    /// `failed (exit_code)`.
    fn state_text(&self) -> String {
        match &self.reason {
            Some(reason) => format!("{} ({reason})", self.state),
            None => self.state.clone(),
        }
    }
}

fn timestamp(text: &str) -> Option<jiff::Timestamp> {
    text.parse().ok()
}

/// kubectl's short durations: two units at most.
pub(crate) fn short_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 if s % 60 == 0 => format!("{}m", s / 60),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 if s % 3600 / 60 == 0 => format!("{}h", s / 3600),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ if s % 86_400 / 3600 == 0 => format!("{}d", s / 86_400),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn or_dash(value: Option<String>) -> String {
    value.unwrap_or_else(|| "-".to_owned())
}

pub(crate) fn dollars(amount: f64) -> String {
    if amount == 0.0 {
        "$0".to_owned()
    } else if amount < 0.01 {
        format!("${amount:.4}")
    } else {
        format!("${amount:.2}")
    }
}

/// A table without borders, columns left-aligned and two spaces apart (kubectl's look).
pub(crate) fn plain_table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(headers.iter().copied());
    for row in rows {
        table.add_row(row);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
        column.set_cell_alignment(CellAlignment::Left);
        column.set_constraint(ColumnConstraint::ContentWidth);
    }
    let mut text: String = table
        .lines()
        .map(|line| line.trim_end().to_owned() + "\n")
        .collect();
    if text.is_empty() {
        text.push('\n');
    }
    text
}

/// The `list` table; `wide` adds QUEUE, PRIORITY, EXIT and IMAGE.
pub(crate) fn task_table(tasks: &[Task], now: jiff::Timestamp, wide: bool) -> String {
    let mut headers = vec![
        "NAME", "ID", "STATE", "ATTEMPT", "AGE", "DURATION", "COST", "GPU",
    ];
    if wide {
        headers.extend(["QUEUE", "PRIORITY", "EXIT", "IMAGE"]);
    }
    let rows = tasks
        .iter()
        .map(|task| {
            let mut row = vec![
                task.name.clone(),
                task.id.clone(),
                task.state_text(),
                task.attempt.to_string(),
                or_dash(task.age(now).map(short_duration)),
                or_dash(task.duration(now).map(short_duration)),
                dollars(task.cost.total_dollars),
                task.gpu(),
            ];
            if wide {
                row.extend([
                    task.queue.clone(),
                    task.priority.to_string(),
                    or_dash(task.exit_code.map(|c| c.to_string())),
                    task.image.clone(),
                ]);
            }
            row
        })
        .collect();
    plain_table(&headers, rows)
}

/// The `get` summary: one `Key: value` line each, the ones that apply.
pub(crate) fn task_summary(task: &Task, now: jiff::Timestamp) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("Name", task.name.clone()),
        ("ID", task.id.clone()),
        ("State", task.state_text()),
    ];
    if let Some(code) = task.exit_code {
        lines.push(("Exit code", code.to_string()));
    }
    lines.push((
        "Attempt",
        format!(
            "{} (retries used {} of {})",
            task.attempt, task.retries_used, task.max_retries
        ),
    ));
    if let Some(at) = &task.next_attempt_at {
        lines.push(("Next attempt", at.clone()));
    }
    if let Some(position) = task.queue_position {
        lines.push(("Queue position", position.to_string()));
    }
    lines.push(("Image", task.image.clone()));
    let argv: Vec<&str> = task
        .command
        .iter()
        .chain(&task.args)
        .map(String::as_str)
        .collect();
    lines.push(("Command", shell_words(&argv)));
    lines.push((
        "Queue",
        format!("{} (priority {})", task.queue, task.priority),
    ));
    let mut resources = Vec::new();
    if let Some(cpu) = &task.resources.cpu {
        resources.push(format!("cpu {cpu}"));
    }
    if let Some(memory) = &task.resources.memory {
        resources.push(format!("memory {memory}"));
    }
    if task.resources.gpu.is_some() {
        resources.push(format!("gpu {}", task.gpu()));
    }
    if !resources.is_empty() {
        lines.push(("Resources", resources.join(", ")));
    }
    if !task.labels.is_empty() {
        let labels: Vec<String> = task
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        lines.push(("Labels", labels.join(",")));
    }
    if let Some(seconds) = task.timeout_seconds {
        lines.push(("Timeout", short_duration(seconds as i64)));
    }
    if let Some(age) = task.age(now) {
        lines.push((
            "Created",
            format!("{} ({} ago)", task.created_at, short_duration(age)),
        ));
    }
    if let Some(started) = &task.started_at {
        lines.push(("Started", started.clone()));
    }
    if let Some(finished) = &task.finished_at {
        lines.push(("Finished", finished.clone()));
    }
    if let Some(duration) = task.duration(now) {
        lines.push(("Duration", short_duration(duration)));
    }
    lines.push((
        "Cost",
        format!(
            "{}{}",
            dollars(task.cost.total_dollars),
            if task.cost.settled { "" } else { " so far" }
        ),
    ));
    if let Some(progress) = task.runner.as_ref().and_then(|r| r.progress.as_ref()) {
        let message = progress
            .message
            .as_deref()
            .map(|m| format!(" {m}"))
            .unwrap_or_default();
        lines.push(("Progress", format!("{}%{message}", progress.percent)));
    }
    if let Some(job) = &task.job {
        lines.push(("Job", format!("{}/{}", job.namespace, job.name)));
    }
    let mut text = String::new();
    for (key, value) in &lines {
        let _ = writeln!(text, "{:<15}{value}", format!("{key}:"));
    }
    if let Some(message) = task.message.as_deref().filter(|m| !m.is_empty()) {
        text.push_str("Message:\n");
        for line in message.lines() {
            text.push_str("  ");
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

/// The words quoted the way a shell would need them.
fn shell_words(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
            if plain {
                (*w).to_owned()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `usage`: the groups as a table, then the totals and the budgets.
pub(crate) fn usage_text(usage: &Value) -> String {
    let group = if usage["group_by"] == "day" {
        "DAY"
    } else {
        "QUEUE"
    };
    let rows = usage["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            vec![
                g["key"].as_str().unwrap_or_default().to_owned(),
                g["tasks"].as_i64().unwrap_or_default().to_string(),
                dollars(g["llm_dollars"].as_f64().unwrap_or_default()),
                dollars(g["total_dollars"].as_f64().unwrap_or_default()),
            ]
        })
        .collect();
    let mut text = format!(
        "Tenant {} from {} to {}\n",
        usage["tenant"].as_str().unwrap_or_default(),
        usage["from"].as_str().unwrap_or_default(),
        usage["to"].as_str().unwrap_or_default()
    );
    text.push_str(&plain_table(&[group, "TASKS", "LLM", "TOTAL"], rows));
    let figure = |key: &str| dollars(usage[key].as_f64().unwrap_or_default());
    let _ = writeln!(
        text,
        "Total: {} (tasks still running: {} so far)",
        figure("total_dollars"),
        figure("unfinished_dollars")
    );
    let budget = &usage["budget"];
    let spent = |key: &str| dollars(budget[key].as_f64().unwrap_or_default());
    let _ = writeln!(
        text,
        "Spent today: {}, this month: {}",
        spent("spent_today_dollars"),
        spent("spent_this_month_dollars")
    );
    text
}

/// `-o json` (pretty) or `-o yaml` of any API answer.
pub(crate) fn structured(value: &Value, yaml: bool) -> Result<String> {
    if yaml {
        crate::yaml::to_string(value).map_err(|e| Error::usage(format!("rendering YAML: {e}")))
    } else {
        serde_json::to_string_pretty(value)
            .map(|text| text + "\n")
            .map_err(|e| Error::usage(format!("rendering JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> jiff::Timestamp {
        "2026-12-02T15:00:00Z".parse().unwrap()
    }

    #[test]
    fn durations_read_like_kubectl() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (192, "3m12s"),
            (3600, "1h"),
            (14_700, "4h5m"),
            (86_400, "1d"),
            (183_600, "2d3h"),
            (-5, "0s"),
        ];
        for (seconds, text) in cases {
            assert_eq!(short_duration(seconds), text, "{seconds}");
        }
    }

    #[test]
    fn the_list_table_has_kubectl_columns() {
        let tasks = [
            json!({"id": "019adf00-aaaa", "name": "train", "state": "running", "attempt": 1,
                   "created_at": "2026-12-02T14:55:00Z", "started_at": "2026-12-02T14:58:30Z",
                   "cost": {"total_dollars": 1.5, "settled": false},
                   "resources": {"gpu": {"class": "a100", "count": 2}}, "gpu_class": "h100",
                   "queue": "gpu", "priority": 5, "image": "pytorch"}),
            json!({"id": "019adf00-bbbb", "name": "hello", "state": "failed", "reason": "exit_code",
                   "attempt": 2, "exit_code": 3, "created_at": "2026-12-01T12:00:00Z",
                   "started_at": "2026-12-01T12:00:01Z", "finished_at": "2026-12-01T12:00:03Z",
                   "cost": {"total_dollars": 0.0}, "resources": {}, "queue": "default",
                   "priority": 0, "image": "busybox"}),
            json!({"id": "019adf00-cccc", "name": "waits", "state": "queued", "attempt": 0,
                   "created_at": "2026-12-02T14:59:50Z", "cost": {"total_dollars": 0.0}}),
        ]
        .iter()
        .map(|v| Task::from_value(v).unwrap())
        .collect::<Vec<_>>();
        assert_eq!(
            task_table(&tasks, now(), false),
            "\
NAME   ID             STATE               ATTEMPT  AGE   DURATION  COST   GPU
train  019adf00-aaaa  running             1        5m    1m30s     $1.50  h100:2
hello  019adf00-bbbb  failed (exit_code)  2        1d3h  2s        $0     -
waits  019adf00-cccc  queued              0        10s   -         $0     -
"
        );
        let wide = task_table(&tasks[..1], now(), true);
        assert!(
            wide.starts_with("NAME   ID             STATE    ATTEMPT  AGE  DURATION  COST   GPU     QUEUE  PRIORITY  EXIT  IMAGE\n"),
            "{wide}"
        );
        assert_eq!(task_table(&[], now(), false).lines().count(), 1);
    }

    #[test]
    fn the_summary_shows_what_applies() {
        let task = Task::from_value(&json!({
            "id": "019adf00-bbbb", "name": "hello", "state": "failed", "reason": "exit_code",
            "message": "boom\n", "attempt": 1, "exit_code": 3, "max_retries": 0,
            "created_at": "2026-12-02T14:00:00Z", "started_at": "2026-12-02T14:00:01Z",
            "finished_at": "2026-12-02T14:00:03Z", "cost": {"total_dollars": 0.0, "settled": true},
            "image": "busybox", "command": ["sh", "-c"], "args": ["echo it's; exit 3"],
            "queue": "default", "priority": 0, "timeout_seconds": 3600, "resources": {"cpu": "1"}
        }))
        .unwrap();
        let text = task_summary(&task, now());
        assert!(
            text.contains("State:         failed (exit_code)\n"),
            "{text}"
        );
        assert!(text.contains("Exit code:     3\n"), "{text}");
        assert!(
            text.contains(r"Command:       sh -c 'echo it'\''s; exit 3'"),
            "{text}"
        );
        assert!(text.contains("Duration:      2s\n"), "{text}");
        assert!(text.contains("Resources:     cpu 1\n"), "{text}");
        assert!(text.ends_with("Message:\n  boom\n"), "{text}");
    }

    #[test]
    fn output_formats() {
        let value = json!({"id": "x", "n": 1});
        assert_eq!(
            structured(&value, false).unwrap(),
            "{\n  \"id\": \"x\",\n  \"n\": 1\n}\n"
        );
        // `n` is quoted: a YAML 1.1 reader would take it for `false`.
        assert_eq!(structured(&value, true).unwrap(), "id: x\n\"n\": 1\n");
        assert_eq!(dollars(0.0042), "$0.0042");
    }
}
