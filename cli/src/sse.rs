//! Server-Sent Events, parsed by hand from the response's lines (the WHATWG rules the
//! dispatcher's axum `Sse` writes to): `event:`, `data:` (joined with `\n`), `id:`,
//! comments (`:` lines, the keep-alives) ignored, a blank line ends an event. Then the
//! typed events of `GET /v1/tasks/{id}/events?follow=true&include=progress,logs`.
//!
//! Invariants: a line longer than [`MAX_LINE`] or an event's data longer than
//! [`MAX_DATA`] is an error rather than unbounded memory.

use std::io::{BufRead, Read};

use serde::Deserialize;

/// Longest line read (a log line is far shorter: the dispatcher bounds them).
pub(crate) const MAX_LINE: usize = 1024 * 1024;
/// Largest data of one event.
pub(crate) const MAX_DATA: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// `message` when the event names none.
    pub(crate) event: String,
    pub(crate) data: String,
    pub(crate) id: Option<String>,
}

/// Builds events from lines, one at a time.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    event: Option<String>,
    /// Each `data:` value followed by `\n`, as WHATWG's data buffer.
    data: String,
    id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SseError {
    #[error("reading the event stream: {0}")]
    Read(#[from] std::io::Error),
    #[error("event stream line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("event stream data longer than {MAX_DATA} bytes")]
    DataTooLong,
}

impl Parser {
    /// Takes one line (without its line ending); returns the event a blank line ends.
    pub(crate) fn line(&mut self, line: &str) -> Result<Option<SseEvent>, SseError> {
        if line.is_empty() {
            let mut data = std::mem::take(&mut self.data);
            if data.is_empty() {
                // An event without data is not dispatched (WHATWG); its name is reset.
                self.event = None;
                return Ok(None);
            }
            data.pop();
            return Ok(Some(SseEvent {
                event: self.event.take().unwrap_or_else(|| "message".to_owned()),
                data,
                id: self.id.clone(),
            }));
        }
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                if self.data.len() + value.len() + 1 > MAX_DATA {
                    return Err(SseError::DataTooLong);
                }
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
        Ok(None)
    }
}

/// Reads events from `reader` until it ends, handing each to `on_event`; stops early
/// when `on_event` returns `false`.
pub(crate) fn read_events<R: BufRead>(
    mut reader: R,
    mut on_event: impl FnMut(SseEvent) -> bool,
) -> Result<(), SseError> {
    let mut parser = Parser::default();
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        let read = Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut buffer)?;
        if read == 0 {
            return Ok(());
        }
        if buffer.len() > MAX_LINE {
            return Err(SseError::LineTooLong);
        }
        let line = String::from_utf8_lossy(&buffer);
        let line = line.strip_suffix('\n').unwrap_or(&line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(event) = parser.line(line)?
            && !on_event(event)
        {
            return Ok(());
        }
    }
}

/// A state change (`event: state`), as `EventView` of the API.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub(crate) struct StateEvent {
    pub(crate) id: i64,
    #[serde(default)]
    pub(crate) attempt: u32,
    pub(crate) from: Option<String>,
    pub(crate) to: String,
    pub(crate) reason: Option<String>,
    pub(crate) message: Option<String>,
    pub(crate) exit_code: Option<i64>,
    #[serde(default)]
    pub(crate) at: String,
}

/// A line of the task's output (`event: log`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub(crate) struct LogEvent {
    #[serde(default)]
    pub(crate) attempt: u32,
    /// `stdout` or `stderr`.
    pub(crate) stream: String,
    #[serde(default)]
    pub(crate) time: String,
    pub(crate) line: String,
}

/// The task's reported progress (`event: progress`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub(crate) struct ProgressEvent {
    #[serde(default)]
    pub(crate) attempt: u32,
    pub(crate) percent: f64,
    pub(crate) message: Option<String>,
}

/// An event of the task's stream, typed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TaskEvent {
    State(StateEvent),
    Log(LogEvent),
    Progress(ProgressEvent),
    /// An event this client does not know (a newer server), or whose data it could not
    /// read: skipped.
    Other(String),
}

impl From<SseEvent> for TaskEvent {
    fn from(event: SseEvent) -> Self {
        let parsed = match event.event.as_str() {
            "state" => serde_json::from_str(&event.data).map(Self::State),
            "log" => serde_json::from_str(&event.data).map(Self::Log),
            "progress" => serde_json::from_str(&event.data).map(Self::Progress),
            _ => return Self::Other(event.event),
        };
        parsed.unwrap_or(Self::Other(event.event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str) -> Vec<SseEvent> {
        let mut seen = Vec::new();
        read_events(text.as_bytes(), |e| {
            seen.push(e);
            true
        })
        .unwrap();
        seen
    }

    #[test]
    fn events_are_split_on_blank_lines_and_comments_are_skipped() {
        let text = ": keep-alive\n\nevent: state\nid: 7\ndata: {\"id\":7}\n\n:\n\
                    event:log\ndata:a\ndata: b\n\ndata: plain\r\n\r\n";
        assert_eq!(
            events(text),
            vec![
                SseEvent {
                    event: "state".into(),
                    data: "{\"id\":7}".into(),
                    id: Some("7".into())
                },
                SseEvent {
                    event: "log".into(),
                    data: "a\nb".into(),
                    id: Some("7".into())
                },
                SseEvent {
                    event: "message".into(),
                    data: "plain".into(),
                    id: Some("7".into())
                },
            ]
        );
    }

    #[test]
    fn an_unfinished_event_at_the_end_is_not_dispatched() {
        assert!(events("event: state\ndata: {}\n").is_empty());
        assert!(events("event: state\n\n").is_empty());
    }

    #[test]
    fn an_endless_line_is_refused() {
        let long = "data: ".to_owned() + &"x".repeat(MAX_LINE + 10);
        let error = read_events(long.as_bytes(), |_| true).unwrap_err();
        assert!(matches!(error, SseError::LineTooLong), "{error}");
    }

    #[test]
    fn events_are_typed_by_name() {
        let state = SseEvent {
            event: "state".into(),
            data: r#"{"id":3,"attempt":1,"from":"running","to":"failed","reason":"exit_code","exit_code":3,"at":"2026-12-02T15:00:00Z"}"#.into(),
            id: None,
        };
        let TaskEvent::State(state) = TaskEvent::from(state) else {
            panic!("not a state")
        };
        assert_eq!(
            (state.id, state.to.as_str(), state.exit_code),
            (3, "failed", Some(3))
        );

        let log = SseEvent {
            event: "log".into(),
            data: r#"{"attempt":1,"stream":"stderr","time":"2026-12-02T15:00:00Z","line":"boom"}"#
                .into(),
            id: None,
        };
        assert_eq!(
            TaskEvent::from(log),
            TaskEvent::Log(LogEvent {
                attempt: 1,
                stream: "stderr".into(),
                time: "2026-12-02T15:00:00Z".into(),
                line: "boom".into()
            })
        );

        let progress = SseEvent {
            event: "progress".into(),
            data: r#"{"attempt":1,"percent":42.0,"time":"2026-12-02T15:00:00Z"}"#.into(),
            id: None,
        };
        assert_eq!(
            TaskEvent::from(progress),
            TaskEvent::Progress(ProgressEvent {
                attempt: 1,
                percent: 42.0,
                message: None
            })
        );

        let odd = SseEvent {
            event: "log".into(),
            data: "not json".into(),
            id: None,
        };
        assert_eq!(TaskEvent::from(odd), TaskEvent::Other("log".into()));
    }
}
