//! The line protocol the workload reports progress and LLM usage with: one line per
//! report, appended to the file named by `AGENT_BUS_REPORT_FILE`.
//!
//! ```text
//! progress 40 epoch 2/5
//! usage model=gpt-4o calls=1 input_tokens=1200 output_tokens=300 cost_usd=0.0123
//! ```
//!
//! This module owns the grammar (parse and format, both pure), the tailer that turns the
//! file's complete lines into [`Line`]s, and the appender behind `runner report`.
//! A line that does not parse is a [`LineError`] naming the field; the tailer skips it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use protocol::{Progress, Usage};

/// Longest line the tailer keeps; a longer one is skipped whole.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Longest progress message passed on (longer ones are cut at a character boundary).
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest model name accepted.
pub const MAX_MODEL_BYTES: usize = 256;

/// One well-formed line.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Progress(Progress),
    Usage(Usage),
}

/// Why a line was rejected; `field` names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("unknown kind {0:?} (expected progress or usage)")]
    UnknownKind(String),
    #[error("{field} is missing")]
    Missing { field: &'static str },
    #[error("{field} {value:?} is invalid: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("unknown field {0:?} (expected model, calls, input_tokens, output_tokens, cost_usd)")]
    UnknownField(String),
    #[error("line is longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    #[error("line is not UTF-8")]
    NotUtf8,
}

impl LineError {
    fn invalid(field: &str, value: &str, reason: &'static str) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            value: value.to_owned(),
            reason,
        }
    }
}

/// Parses one line (without its newline). `Ok(None)` for blank lines and `#` comments.
pub fn parse_line(line: &str) -> Result<Option<Line>, LineError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let (kind, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    match kind {
        "progress" => parse_progress(rest.trim_start()).map(|p| Some(Line::Progress(p))),
        "usage" => parse_usage(rest).map(|u| Some(Line::Usage(u))),
        other => Err(LineError::UnknownKind(truncate(other, 64).to_owned())),
    }
}

fn parse_progress(rest: &str) -> Result<Progress, LineError> {
    let (percent, message) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if percent.is_empty() {
        return Err(LineError::Missing { field: "percent" });
    }
    let percent = validate_percent(percent)?;
    let message = clean_message(message);
    Ok(Progress {
        percent,
        message: (!message.is_empty()).then_some(message),
    })
}

/// A percentage between 0 and 100.
pub fn validate_percent(value: &str) -> Result<f64, LineError> {
    let percent: f64 = value
        .parse()
        .map_err(|_| LineError::invalid("percent", value, "not a number"))?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(LineError::invalid(
            "percent",
            value,
            "must be between 0 and 100",
        ));
    }
    Ok(percent)
}

/// A message on one line, trimmed and at most [`MAX_MESSAGE_BYTES`].
#[must_use]
pub fn clean_message(message: &str) -> String {
    let one_line: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncate(one_line.trim(), MAX_MESSAGE_BYTES).to_owned()
}

fn parse_usage(rest: &str) -> Result<Usage, LineError> {
    let mut usage = Usage::default();
    let mut model = None;
    for pair in rest.split_whitespace() {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| LineError::invalid("usage", pair, "expected key=value"))?;
        match key {
            "model" => model = Some(validate_model(value)?),
            "calls" => usage.calls = parse_count("calls", value)?,
            "input_tokens" => usage.input_tokens = parse_count("input_tokens", value)?,
            "output_tokens" => usage.output_tokens = parse_count("output_tokens", value)?,
            "cost_usd" => usage.cost_usd = validate_cost(value)?,
            other => return Err(LineError::UnknownField(truncate(other, 64).to_owned())),
        }
    }
    usage.model = model.ok_or(LineError::Missing { field: "model" })?;
    Ok(usage)
}

/// A model name: not empty, no whitespace or control characters, at most
/// [`MAX_MODEL_BYTES`].
pub fn validate_model(value: &str) -> Result<String, LineError> {
    if value.is_empty() {
        return Err(LineError::invalid("model", value, "must not be empty"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(LineError::invalid(
            "model",
            value,
            "must not contain spaces or control characters",
        ));
    }
    if value.len() > MAX_MODEL_BYTES {
        return Err(LineError::invalid("model", value, "is too long"));
    }
    Ok(value.to_owned())
}

fn parse_count(field: &'static str, value: &str) -> Result<u64, LineError> {
    value
        .parse()
        .map_err(|_| LineError::invalid(field, value, "not a whole number >= 0"))
}

/// Dollars: a finite number >= 0.
pub fn validate_cost(value: &str) -> Result<f64, LineError> {
    match value.parse::<f64>() {
        Ok(cost) if cost.is_finite() && cost >= 0.0 => Ok(cost),
        _ => Err(LineError::invalid(
            "cost_usd",
            value,
            "must be a number >= 0",
        )),
    }
}

/// The line (with its newline) that [`parse_line`] reads back as `line`.
#[must_use]
pub fn format_line(line: &Line) -> String {
    match line {
        Line::Progress(p) => match p.message.as_deref().map(clean_message) {
            Some(message) if !message.is_empty() => format!("progress {} {message}\n", p.percent),
            _ => format!("progress {}\n", p.percent),
        },
        Line::Usage(u) => format!(
            "usage model={} calls={} input_tokens={} output_tokens={} cost_usd={}\n",
            u.model, u.calls, u.input_tokens, u.output_tokens, u.cost_usd
        ),
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// Appends `line` to the report file in one `write`, so concurrent writers (O_APPEND)
/// never interleave within a line.
pub fn append_line(path: &Path, line: &Line) -> std::io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(format_line(line).as_bytes())
}

/// Splits a growing byte stream into complete lines; keeps the unfinished rest.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    /// The current line grew past [`MAX_LINE_BYTES`]; skip it up to its newline.
    skipping: bool,
}

impl LineSplitter {
    /// Feeds bytes; returns each complete line (or the error of an oversized one).
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Result<String, LineError>> {
        let mut out = Vec::new();
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n') {
            let (head, tail) = bytes.split_at(pos);
            bytes = &tail[1..];
            if self.skipping {
                self.skipping = false;
                self.partial.clear();
                continue;
            }
            self.partial.extend_from_slice(head);
            let raw = std::mem::take(&mut self.partial);
            out.push(if raw.len() > MAX_LINE_BYTES {
                Err(LineError::TooLong)
            } else {
                String::from_utf8(raw).map_err(|_| LineError::NotUtf8)
            });
        }
        if !self.skipping {
            self.partial.extend_from_slice(bytes);
            if self.partial.len() > MAX_LINE_BYTES {
                self.partial.clear();
                self.skipping = true;
                out.push(Err(LineError::TooLong));
            }
        }
        out
    }
}

/// Follows the report file: each [`poll`](Tailer::poll) reads what was appended since.
#[derive(Debug)]
pub struct Tailer {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
    splitter: LineSplitter,
}

impl Tailer {
    /// Starts at `offset` (0 for a file the runner created, its length for one that
    /// already existed).
    #[must_use]
    pub fn new(path: PathBuf, offset: u64) -> Self {
        Self {
            path,
            file: None,
            offset,
            splitter: LineSplitter::default(),
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete lines appended since the last poll, parsed. I/O errors (the file was
    /// removed) read as "nothing new".
    pub fn poll(&mut self) -> Vec<Result<Line, LineError>> {
        let mut bytes = Vec::new();
        if self.read_new(&mut bytes).is_err() {
            self.file = None;
        }
        self.splitter
            .push(&bytes)
            .into_iter()
            .filter_map(|line| match line {
                Ok(text) => parse_line(&text).transpose(),
                Err(e) => Some(Err(e)),
            })
            .collect()
    }

    fn read_new(&mut self, bytes: &mut Vec<u8>) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(File::open(&self.path)?);
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            // Truncated: start over from its beginning.
            self.offset = 0;
            self.splitter = LineSplitter::default();
        }
        if len == self.offset {
            return Ok(());
        }
        file.seek(SeekFrom::Start(self.offset))?;
        // At most 4 MiB per poll; the rest comes with the next one.
        let read = file.take(4 << 20).read_to_end(bytes)?;
        self.offset += read as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(percent: f64, message: Option<&str>) -> Line {
        Line::Progress(Progress {
            percent,
            message: message.map(str::to_owned),
        })
    }

    #[test]
    fn parses_progress_with_and_without_message() {
        assert_eq!(
            parse_line("progress 40 epoch 2/5"),
            Ok(Some(progress(40.0, Some("epoch 2/5"))))
        );
        assert_eq!(parse_line("progress 12.5"), Ok(Some(progress(12.5, None))));
        assert_eq!(
            parse_line("  progress\t100   done  \r"),
            Ok(Some(progress(100.0, Some("done"))))
        );
    }

    #[test]
    fn parses_usage_with_defaults() {
        let line = parse_line(
            "usage model=gpt-4o calls=1 input_tokens=1200 output_tokens=300 cost_usd=0.0123",
        );
        assert_eq!(
            line,
            Ok(Some(Line::Usage(Usage {
                model: "gpt-4o".into(),
                calls: 1,
                input_tokens: 1200,
                output_tokens: 300,
                cost_usd: 0.0123,
            })))
        );
        assert_eq!(
            parse_line("usage model=claude-sonnet-4"),
            Ok(Some(Line::Usage(Usage {
                model: "claude-sonnet-4".into(),
                ..Usage::default()
            })))
        );
    }

    #[test]
    fn blank_lines_and_comments_are_nothing() {
        assert_eq!(parse_line(""), Ok(None));
        assert_eq!(parse_line("   "), Ok(None));
        assert_eq!(parse_line("# a note"), Ok(None));
    }

    #[test]
    fn bad_lines_name_the_field() {
        let field_of = |line: &str| match parse_line(line) {
            Err(LineError::Invalid { field, .. }) => field,
            Err(LineError::Missing { field }) => field.to_owned(),
            Err(LineError::UnknownField(f)) => format!("unknown:{f}"),
            Err(LineError::UnknownKind(k)) => format!("kind:{k}"),
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!(field_of("progress"), "percent");
        assert_eq!(field_of("progress abc"), "percent");
        assert_eq!(field_of("progress 140"), "percent");
        assert_eq!(field_of("progress -1"), "percent");
        assert_eq!(field_of("progress NaN"), "percent");
        assert_eq!(field_of("usage calls=1"), "model");
        assert_eq!(field_of("usage model="), "model");
        assert_eq!(field_of("usage model=m calls=-1"), "calls");
        assert_eq!(field_of("usage model=m input_tokens=1.5"), "input_tokens");
        assert_eq!(field_of("usage model=m output_tokens=x"), "output_tokens");
        assert_eq!(field_of("usage model=m cost_usd=-0.1"), "cost_usd");
        assert_eq!(field_of("usage model=m cost_usd=inf"), "cost_usd");
        assert_eq!(field_of("usage model=m colour=red"), "unknown:colour");
        assert_eq!(field_of("usage model=m stray"), "usage");
        assert_eq!(field_of("epoch 3"), "kind:epoch");
    }

    #[test]
    fn format_and_parse_round_trip() {
        let lines = [
            progress(40.0, Some("epoch 2/5")),
            progress(0.0, None),
            progress(99.9, Some("multi\nline\tmessage")),
            Line::Usage(Usage {
                model: "gpt-4o".into(),
                calls: 3,
                input_tokens: 1,
                output_tokens: 2,
                cost_usd: 0.0123,
            }),
        ];
        for line in lines {
            let text = format_line(&line);
            assert!(
                text.ends_with('\n') && text.matches('\n').count() == 1,
                "{text:?}"
            );
            let back = parse_line(text.trim_end_matches('\n')).unwrap().unwrap();
            match (&line, &back) {
                (Line::Progress(a), Line::Progress(b)) => {
                    assert!((a.percent - b.percent).abs() < 1e-9);
                    assert_eq!(b.message, a.message.as_deref().map(clean_message));
                }
                _ => assert_eq!(back, line),
            }
        }
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let message = "é".repeat(MAX_MESSAGE_BYTES);
        let cleaned = clean_message(&message);
        assert!(cleaned.len() <= MAX_MESSAGE_BYTES);
        assert!(cleaned.chars().all(|c| c == 'é'));
    }

    #[test]
    fn splitter_keeps_partial_lines_until_complete() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"progress 1").is_empty());
        assert_eq!(s.push(b"0 a\nprog"), vec![Ok("progress 10 a".to_owned())]);
        assert_eq!(
            s.push(b"ress 20\n\n"),
            vec![Ok("progress 20".to_owned()), Ok(String::new())]
        );
    }

    #[test]
    fn splitter_skips_oversized_and_non_utf8_lines() {
        let mut s = LineSplitter::default();
        let big = vec![b'x'; MAX_LINE_BYTES + 1];
        assert_eq!(s.push(&big), vec![Err(LineError::TooLong)]);
        assert!(s.push(b"more of the same").is_empty());
        assert_eq!(s.push(b"\nprogress 5\n"), vec![Ok("progress 5".to_owned())]);
        assert_eq!(s.push(b"\xff\xfe\n"), vec![Err(LineError::NotUtf8)]);
    }

    #[test]
    fn tailer_reads_appended_lines_once() {
        let dir = std::env::temp_dir().join(format!("runner-tailer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report");
        std::fs::write(&path, "").unwrap();
        let mut tailer = Tailer::new(path.clone(), 0);
        assert!(tailer.poll().is_empty());
        append_line(&path, &progress(10.0, Some("a"))).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"bogus\nprogress 2")
            .unwrap();
        let got = tailer.poll();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], Ok(progress(10.0, Some("a"))));
        assert!(matches!(got[1], Err(LineError::UnknownKind(_))));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"0\n")
            .unwrap();
        assert_eq!(tailer.poll(), vec![Ok(progress(20.0, None))]);
        assert!(tailer.poll().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
