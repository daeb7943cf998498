//! `agent-bus wait` and `submit --wait`: follows the task's event stream
//! (`GET /v1/tasks/{id}/events?follow=true&include=progress,logs`), writes its log lines
//! to standard output or standard error by their stream, its state changes to standard
//! error, a progress bar from its reported progress (on a terminal only), and returns the
//! exit code the task's end maps to ([`crate::exit::for_task`]). A dispatcher that cannot
//! be reached at the start is an error at once.
//!
//! Invariants: the task's end is read from `GET /v1/tasks/{id}` after the stream closes,
//! never assumed from the stream; a stream that breaks or closes before the end
//! (dispatcher restarted, proxy timeout) is reopened with backoff for up to
//! `reconnect_for`, and nothing is shown twice: the server replays the history on each
//! connection, so state events are skipped up to the last id shown and log lines up to
//! the count shown per attempt.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::client::Client;
use crate::error::{Error, Result, write_err, write_out};
use crate::exit;
use crate::sse::{self, LogEvent, StateEvent, TaskEvent};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitOptions {
    /// How long to keep reconnecting to a lost stream before giving up.
    pub(crate) reconnect_for: Duration,
    /// Show state changes (standard error).
    pub(crate) states: bool,
}

/// What was shown already, across connections.
#[derive(Debug, Default)]
struct Shown {
    last_state: Option<i64>,
    lines: BTreeMap<u32, u64>,
    any_log: bool,
    /// The final state change, held back until every log line was shown.
    last: Option<StateEvent>,
}

/// What one connection delivered so far.
#[derive(Debug, Default)]
struct Delivered {
    lines: BTreeMap<u32, u64>,
}

impl Shown {
    /// Whether `event` is new (and records it); replays of a reconnection are not.
    fn is_new(&mut self, delivered: &mut Delivered, event: &TaskEvent) -> bool {
        match event {
            TaskEvent::State(state) => {
                if self.last_state.is_some_and(|last| state.id <= last) {
                    return false;
                }
                self.last_state = Some(state.id);
                true
            }
            TaskEvent::Log(log) => {
                let index = delivered.lines.entry(log.attempt).or_default();
                *index += 1;
                let shown = self.lines.entry(log.attempt).or_default();
                if *index <= *shown {
                    return false;
                }
                *shown = *index;
                self.any_log = true;
                true
            }
            TaskEvent::Progress(_) | TaskEvent::Other(_) => true,
        }
    }
}

/// Waits for task `id` to end; its exit code.
pub(crate) fn wait(client: &Client, id: &str, options: WaitOptions) -> Result<u8> {
    let path = format!("/v1/tasks/{id}/events");
    let task_path = format!("/v1/tasks/{id}");
    let mut shown = Shown::default();
    let screen = Screen::new();
    let mut include = true;
    let mut lost_since: Option<Instant> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut connected = false;
    loop {
        let mut query = vec![("follow", "true".to_owned())];
        if include {
            query.push(("include", "progress,logs".to_owned()));
        }
        let outcome = client.stream(&path, &query, false).and_then(|reader| {
            connected = true;
            lost_since = None;
            backoff = FIRST_BACKOFF;
            follow(client, reader, &mut shown, &screen, options)
        });
        let lost = match outcome {
            Ok(()) => None,
            // A dispatcher without log streaming: states only.
            Err(Error::Refused { message }) if include && message.contains("include") => {
                include = false;
                continue;
            }
            // Reconnecting is for a stream that was there: a dispatcher that cannot be
            // reached at all is an error at once.
            Err(e) if e.is_transient() && connected => Some(e),
            Err(e) => {
                screen.clear();
                return Err(e);
            }
        };
        let lost = match client.get_json(&task_path, &[]) {
            Ok(task) => {
                if let Some(code) = ended(&task) {
                    screen.finish(&task, &shown, options);
                    return Ok(code);
                }
                lost.map_or_else(|| "the event stream closed".to_owned(), |e| e.to_string())
            }
            Err(e) if e.is_transient() => e.to_string(),
            Err(e) => {
                screen.clear();
                return Err(e);
            }
        };
        let since = *lost_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= options.reconnect_for {
            screen.clear();
            return Err(Error::Unreachable {
                server: client.server().to_owned(),
                detail: format!(
                    "gave up waiting for task {id} after {}s without its event stream: {lost}",
                    options.reconnect_for.as_secs()
                ),
            });
        }
        screen.note(&format!(
            "agent-bus: {lost}; reconnecting in {:.1}s\n",
            backoff.as_secs_f64()
        ));
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The exit code of a task view whose state is final.
fn ended(task: &Value) -> Option<u8> {
    exit::for_task(task["state"].as_str()?, task["exit_code"].as_i64())
}

/// Shows one connection's events until it closes.
fn follow(
    client: &Client,
    reader: impl std::io::BufRead,
    shown: &mut Shown,
    screen: &Screen,
    options: WaitOptions,
) -> Result<()> {
    let mut delivered = Delivered::default();
    let mut failure = None;
    let read = sse::read_events(reader, |event| {
        let event = TaskEvent::from(event);
        if !shown.is_new(&mut delivered, &event) {
            return true;
        }
        let shown_ok = match event {
            TaskEvent::State(state) if exit::for_task(&state.to, state.exit_code).is_some() => {
                shown.last = Some(state);
                Ok(())
            }
            TaskEvent::State(state) if options.states => {
                screen.note(&state_line(&state, true));
                Ok(())
            }
            TaskEvent::Log(log) => screen.log(&log),
            TaskEvent::Progress(progress) => {
                screen.progress(progress.percent, progress.message.as_deref());
                Ok(())
            }
            TaskEvent::State(_) | TaskEvent::Other(_) => Ok(()),
        };
        match shown_ok {
            Ok(()) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    read.map_err(|e| match e {
        sse::SseError::Read(io) => Error::Unreachable {
            server: client.server().to_owned(),
            detail: format!("the event stream broke: {io}"),
        },
        other => Error::Protocol {
            server: client.server().to_owned(),
            detail: other.to_string(),
        },
    })
}

/// `[15:02:03Z] failed (exit_code, exit code 3) attempt 1`, and the output tail the
/// dispatcher keeps in the message when no log lines were streamed.
pub(crate) fn state_line(state: &StateEvent, logs_streamed: bool) -> String {
    let time = state
        .at
        .get(11..19)
        .map_or_else(String::new, |t| format!("[{t}Z] "));
    let mut detail = Vec::new();
    if let Some(reason) = &state.reason {
        detail.push(reason.clone());
    }
    if let Some(code) = state.exit_code {
        detail.push(format!("exit code {code}"));
    }
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", detail.join(", "))
    };
    let attempt = if state.attempt > 0 {
        format!(" attempt {}", state.attempt)
    } else {
        String::new()
    };
    let mut line = format!("{time}{}{detail}{attempt}\n", state.to);
    if !logs_streamed && let Some(message) = state.message.as_deref() {
        for text in message.lines().take(40) {
            line.push_str("    ");
            line.push_str(text);
            line.push('\n');
        }
    }
    line
}

/// The terminal: log lines, notes and the progress bar, which steps aside while a line
/// is written.
struct Screen {
    bar: std::cell::RefCell<Option<ProgressBar>>,
}

impl Screen {
    fn new() -> Self {
        Self {
            bar: std::cell::RefCell::new(None),
        }
    }

    fn around<T>(&self, write: impl FnOnce() -> T) -> T {
        match self.bar.borrow().as_ref() {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    fn note(&self, text: &str) {
        self.around(|| write_err(text));
    }

    fn log(&self, log: &LogEvent) -> Result<()> {
        let line = format!("{}\n", log.line);
        self.around(|| {
            if log.stream == "stderr" {
                write_err(&line);
                Ok(())
            } else {
                write_out(&line)
            }
        })
    }

    /// Draws (or moves) the bar: on a terminal only, as indicatif's stderr target hides
    /// itself elsewhere.
    fn progress(&self, percent: f64, message: Option<&str>) {
        let mut bar = self.bar.borrow_mut();
        let bar = bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos:>3}% {wide_msg}") {
                bar.set_style(style);
            }
            bar
        });
        bar.set_position(percent.clamp(0.0, 100.0) as u64);
        bar.set_message(message.unwrap_or_default().to_owned());
    }

    fn clear(&self) {
        if let Some(bar) = self.bar.borrow_mut().take() {
            bar.finish_and_clear();
        }
    }

    /// The bar goes, and the final state change is shown (from the task when the stream
    /// did not carry it), with the output tail the dispatcher keeps in its message when no
    /// log lines were streamed.
    fn finish(&self, task: &Value, shown: &Shown, options: WaitOptions) {
        self.clear();
        if !options.states {
            return;
        }
        let state = shown.last.clone().unwrap_or_else(|| StateEvent {
            id: 0,
            attempt: task["attempt"].as_u64().unwrap_or_default() as u32,
            from: None,
            to: task["state"].as_str().unwrap_or_default().to_owned(),
            reason: task["reason"].as_str().map(str::to_owned),
            message: task["message"].as_str().map(str::to_owned),
            exit_code: task["exit_code"].as_i64(),
            at: task["finished_at"].as_str().unwrap_or_default().to_owned(),
        });
        self.note(&state_line(&state, shown.any_log));
    }
}

/// `logs ID`: the body of `GET /v1/tasks/{id}/logs` copied to standard output as it
/// arrives.
pub(crate) fn copy_stream(client: &Client, mut reader: impl Read) -> Result<()> {
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buffer).map_err(|e| Error::Unreachable {
            server: client.server().to_owned(),
            detail: format!("the log stream broke: {e}"),
        })?;
        if n == 0 {
            return Ok(());
        }
        write_out(&String::from_utf8_lossy(&buffer[..n]))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: i64, to: &str) -> TaskEvent {
        TaskEvent::State(StateEvent {
            id,
            attempt: 1,
            from: None,
            to: to.into(),
            reason: None,
            message: None,
            exit_code: None,
            at: "2026-12-02T15:02:03.123Z".into(),
        })
    }

    fn log(attempt: u32, line: &str) -> TaskEvent {
        TaskEvent::Log(LogEvent {
            attempt,
            stream: "stdout".into(),
            time: String::new(),
            line: line.into(),
        })
    }

    #[test]
    fn a_reconnection_shows_nothing_twice() {
        let mut shown = Shown::default();
        let first = [
            state(1, "queued"),
            state(2, "running"),
            log(1, "a"),
            log(1, "b"),
        ];
        let mut delivered = Delivered::default();
        assert!(first.iter().all(|e| shown.is_new(&mut delivered, e)));
        // The server replays the history on the next connection, then goes on.
        let second = [
            state(1, "queued"),
            state(2, "running"),
            log(1, "a"),
            log(1, "b"),
            log(1, "c"),
            state(3, "failed"),
            log(2, "a"),
        ];
        let mut delivered = Delivered::default();
        let new: Vec<bool> = second
            .iter()
            .map(|e| shown.is_new(&mut delivered, e))
            .collect();
        assert_eq!(new, [false, false, false, false, true, true, true]);
    }

    #[test]
    fn state_lines_say_the_state_reason_and_exit_code() {
        let TaskEvent::State(mut event) = state(3, "failed") else {
            unreachable!()
        };
        event.reason = Some("exit_code".into());
        event.exit_code = Some(3);
        event.message = Some("boom\n".into());
        assert_eq!(
            state_line(&event, true),
            "[15:02:03Z] failed (exit_code, exit code 3) attempt 1\n"
        );
        assert_eq!(
            state_line(&event, false),
            "[15:02:03Z] failed (exit_code, exit code 3) attempt 1\n    boom\n",
            "without streamed logs the output tail is shown"
        );
    }
}
