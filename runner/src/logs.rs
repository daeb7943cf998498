//! Shipping of the command's output lines to the dispatcher, beside the pass-through to
//! the runner's own stdout and stderr (which `kubectl logs` reads): each line with its
//! stream and the time the runner read it, in batches POSTed to the attempt's `/logs`
//! route (the sibling of `/reports`, same token).
//!
//! Bounds, so the command's output can never grow the runner without limit:
//! - a line is at most [`MAX_LINE_BYTES`]; a longer one is cut there and ends with a
//!   marker saying how many bytes were cut ([`LineCutter`]); invalid UTF-8 is replaced;
//! - the lines waiting for delivery take at most `limit` bytes ([`LogBuffer`]): when the
//!   dispatcher is slow or down, new lines are dropped and counted, and a marker line
//!   saying how many goes in their place once there is room again (or at the end);
//! - a batch is sent when [`BATCH_BYTES`] are waiting or the oldest line waited
//!   [`FLUSH_EVERY`], whichever comes first.
//!
//! Answers: 2xx delivered (a receipt with `capped` means the dispatcher keeps no more
//! lines of this attempt: stop sending); 401, 403, 404, 409 stop (the token or attempt is
//! not accepted any more); 408, 429, 5xx and connection errors retry with the reports'
//! backoff; any other 4xx drops that batch.
//!
//! The run flushes this shipper before it sends its `finished` report, so a task seen
//! ended has its lines stored (unless the flush ran out of time).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use protocol::{LogBatch, LogLine, LogReceipt, LogStream};

use crate::sender::{
    Verdict, backoff, report_agent, request_timeout, verdict, wait_for_change, wait_while,
};

/// The longest line shipped; the rest of a longer line is cut (and counted).
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// A batch is sent once this many bytes of lines wait…
pub const BATCH_BYTES: usize = 64 * 1024;
/// …or once the oldest waiting line is this old.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The most lines per POST.
pub const MAX_BATCH_LINES: usize = 1000;
/// Bytes of lines kept while the dispatcher does not take them.
pub const DEFAULT_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// What a line costs in the buffer besides its text (sequence, time, bookkeeping).
const LINE_OVERHEAD: usize = 64;

/// Splits one stream's bytes into lines of at most [`MAX_LINE_BYTES`], keeping the
/// unfinished rest (bounded too) for the next chunk.
#[derive(Debug, Default)]
pub struct LineCutter {
    partial: Vec<u8>,
    /// Bytes of the current line beyond [`MAX_LINE_BYTES`], dropped.
    cut: u64,
}

impl LineCutter {
    /// Feeds a chunk; returns every line it completed, without the newline (nor a `\r`
    /// before it).
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n') {
            self.take(&bytes[..pos]);
            bytes = &bytes[pos + 1..];
            lines.push(self.line());
        }
        self.take(bytes);
        lines
    }

    /// The unfinished last line, at the end of the stream.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty() || self.cut > 0).then(|| self.line())
    }

    fn take(&mut self, bytes: &[u8]) {
        let room = MAX_LINE_BYTES.saturating_sub(self.partial.len());
        let (kept, cut) = bytes.split_at(bytes.len().min(room));
        self.partial.extend_from_slice(kept);
        self.cut += cut.len() as u64;
    }

    fn line(&mut self) -> String {
        let mut raw = std::mem::take(&mut self.partial);
        if self.cut == 0 && raw.last() == Some(&b'\r') {
            raw.pop();
        }
        let mut text = String::from_utf8_lossy(&raw).into_owned();
        let cut = std::mem::take(&mut self.cut);
        if cut > 0 {
            let _ = write!(
                text,
                " [agent-bus: line cut at {MAX_LINE_BYTES} bytes, {cut} more bytes not kept]"
            );
        }
        text
    }
}

/// Lines waiting for delivery, numbered in the order they were read, bounded in bytes by
/// dropping new lines (counted) rather than old ones: what is kept stays contiguous, and a
/// marker says where the gap is.
#[derive(Debug)]
pub struct LogBuffer {
    lines: VecDeque<LogLine>,
    bytes: usize,
    limit: usize,
    next_sequence: u64,
    /// Lines dropped since the last marker, and their bytes.
    gap_lines: u64,
    gap_bytes: u64,
    /// Lines that will never be delivered: dropped for space or refused.
    dropped: u64,
}

fn cost(line: &LogLine) -> usize {
    line.line.len() + LINE_OVERHEAD
}

impl LogBuffer {
    #[must_use]
    pub fn new(limit: usize, first_sequence: u64) -> Self {
        Self {
            lines: VecDeque::new(),
            bytes: 0,
            limit,
            next_sequence: first_sequence.max(1),
            gap_lines: 0,
            gap_bytes: 0,
            dropped: 0,
        }
    }

    /// Adds a line read at `time`, or drops it (counted) when the buffer is full.
    pub fn push(&mut self, stream: LogStream, time: &str, text: String) {
        let needed = text.len() + LINE_OVERHEAD;
        if self.gap_lines > 0 && self.bytes + needed + MARKER_ROOM <= self.limit {
            self.close_gap(time);
        }
        if self.gap_lines > 0 || self.bytes + needed > self.limit {
            self.gap_lines += 1;
            self.gap_bytes += text.len() as u64;
            self.dropped += 1;
            return;
        }
        self.append(stream, time, text);
    }

    /// Puts the marker of a gap (if any) in: at the end of the run, even past the limit.
    pub fn close_gap(&mut self, time: &str) {
        if self.gap_lines == 0 {
            return;
        }
        let text = format!(
            "[agent-bus: {} lines ({} bytes) of output dropped here: the dispatcher did not take them fast enough]",
            self.gap_lines, self.gap_bytes
        );
        self.gap_lines = 0;
        self.gap_bytes = 0;
        self.append(LogStream::Stderr, time, text);
    }

    fn append(&mut self, stream: LogStream, time: &str, line: String) {
        let line = LogLine {
            sequence: self.next_sequence,
            stream,
            time: time.to_owned(),
            line,
        };
        self.next_sequence += 1;
        self.bytes += cost(&line);
        self.lines.push_back(line);
    }

    /// The oldest lines, at most [`BATCH_BYTES`] (at least one) and [`MAX_BATCH_LINES`].
    #[must_use]
    pub fn batch(&self) -> Vec<LogLine> {
        let mut size = 0;
        let mut out = Vec::new();
        for line in self.lines.iter().take(MAX_BATCH_LINES) {
            size += cost(line);
            if !out.is_empty() && size > BATCH_BYTES {
                break;
            }
            out.push(line.clone());
        }
        out
    }

    /// Removes the oldest `count` lines (delivered, or refused when `refused`).
    pub fn remove_front(&mut self, count: usize, refused: bool) {
        for line in self.lines.drain(..count.min(self.lines.len())) {
            self.bytes -= cost(&line);
            if refused {
                self.dropped += 1;
            }
        }
    }

    /// Drops everything, counting it as undelivered.
    pub fn drop_all(&mut self) {
        self.dropped += self.lines.len() as u64;
        self.lines.clear();
        self.bytes = 0;
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Bytes waiting (with the per-line overhead).
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lines that will never be delivered: dropped, plus those still waiting.
    #[must_use]
    pub fn undelivered(&self) -> u64 {
        self.dropped + self.lines.len() as u64
    }
}

/// Room kept for a gap's marker line when the gap closes.
const MARKER_ROOM: usize = 256;

#[derive(Debug)]
struct State {
    buffer: LogBuffer,
    /// When the oldest waiting line was pushed.
    oldest: Option<Instant>,
    flush_by: Option<Instant>,
    done: bool,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The copy threads' side: push lines; the run's side: flush before `finished`.
#[derive(Debug, Clone, Default)]
pub struct Shipper {
    inner: Option<Arc<Inner>>,
}

/// The time a line was read, as shipped.
fn now_text() -> String {
    format!("{:.6}", jiff::Timestamp::now())
}

impl Shipper {
    /// A shipper that ships nothing (no report URL).
    #[must_use]
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Starts the shipping thread, POSTing to `url` with `token`.
    #[must_use]
    pub fn start(url: String, token: Option<String>, limit: usize, first_sequence: u64) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                buffer: LogBuffer::new(limit, first_sequence),
                oldest: None,
                flush_by: None,
                done: false,
            }),
            changed: Condvar::new(),
        });
        let shared = Arc::clone(&inner);
        let spawned = std::thread::Builder::new()
            .name("log-shipper".into())
            .spawn(move || ship_loop(&url, token.as_deref(), &shared));
        match spawned {
            Ok(_) => Self { inner: Some(inner) },
            Err(e) => {
                crate::log!("logs are not shipped: cannot start the shipping thread: {e}");
                Self::disabled()
            }
        }
    }

    /// Queues lines of one stream (read now); never blocks on the network.
    pub fn push(&self, stream: LogStream, lines: Vec<String>) {
        let Some(inner) = &self.inner else {
            return;
        };
        if lines.is_empty() {
            return;
        }
        let time = now_text();
        let mut state = inner.lock();
        if state.done {
            state.buffer.dropped += lines.len() as u64;
            return;
        }
        for line in lines {
            state.buffer.push(stream, &time, line);
        }
        // The shipping thread sleeps without a deadline while nothing waits: wake it for
        // the first line (it then sleeps until that line is due) and for a full batch.
        let first = state.oldest.is_none();
        state.oldest.get_or_insert_with(Instant::now);
        let full = state.buffer.bytes() >= BATCH_BYTES;
        drop(state);
        if first || full {
            inner.changed.notify_all();
        }
    }

    /// Sends what is left and waits until it is delivered or `within` passed; how many
    /// lines were not delivered (0 when nothing is shipped).
    #[must_use]
    pub fn flush(&self, within: Duration) -> u64 {
        let Some(inner) = &self.inner else {
            return 0;
        };
        let deadline = Instant::now() + within;
        let mut state = inner.lock();
        if !state.done {
            state.buffer.close_gap(&now_text());
        }
        state.flush_by = Some(deadline);
        inner.changed.notify_all();
        state = wait_while(&inner.changed, state, deadline, |state| {
            !state.done && !state.buffer.is_empty()
        });
        state.buffer.undelivered()
    }
}

fn ship_loop(url: &str, token: Option<&str>, inner: &Inner) {
    let agent = report_agent();
    let mut jitter = crate::sender::Jitter::seeded();
    let mut failures: u32 = 0;
    let mut next_try = Instant::now();
    let mut warned = false;
    loop {
        let (batch, timeout) = {
            let mut state = inner.lock();
            loop {
                let now = Instant::now();
                if state.flush_by.is_some_and(|by| now >= by) {
                    state.done = true;
                    inner.changed.notify_all();
                    return;
                }
                let due = state.flush_by.is_some()
                    || state.buffer.bytes() >= BATCH_BYTES
                    || state.oldest.is_some_and(|at| now >= at + FLUSH_EVERY);
                if !state.buffer.is_empty() && due && now >= next_try {
                    break;
                }
                let wake = [
                    state.flush_by,
                    state.oldest.map(|at| (at + FLUSH_EVERY).max(next_try)),
                ]
                .into_iter()
                .flatten()
                .min();
                state = wait_for_change(&inner.changed, state, wake, now);
            }
            let timeout = request_timeout(state.flush_by);
            (state.buffer.batch(), timeout)
        };
        let count = batch.len();
        let outcome = post(&agent, url, token, batch, timeout);
        let mut state = inner.lock();
        let judged = match &outcome {
            Ok((status, _)) => Some(verdict(*status)),
            Err(_) => None,
        };
        match (outcome, judged) {
            (Ok((_, receipt)), Some(Verdict::Delivered)) => {
                state.buffer.remove_front(count, false);
                failures = 0;
                next_try = Instant::now();
                if receipt.is_some_and(|r| r.capped) {
                    crate::log!(
                        "the dispatcher keeps no more output lines of this attempt (its cap); the rest stays in the container's output only"
                    );
                    state.buffer.drop_all();
                    state.done = true;
                }
            }
            (Ok((status, _)), Some(Verdict::Stop)) => {
                crate::log!(
                    "output lines not accepted (HTTP {status}); no further lines are shipped"
                );
                state.buffer.drop_all();
                state.done = true;
            }
            (Ok((status, _)), Some(Verdict::DropBatch)) => {
                if !warned {
                    crate::log!(
                        "a batch of output lines was not accepted (HTTP {status}); dropped"
                    );
                    warned = true;
                }
                state.buffer.remove_front(count, true);
                next_try = Instant::now();
            }
            // Retry: a 5xx, 408, 429 (no allowance is shed for logs), or no answer.
            _ => {
                failures = failures.saturating_add(1);
                next_try = Instant::now() + backoff(failures, jitter.next());
            }
        }
        state.oldest = (!state.buffer.is_empty()).then(Instant::now);
        let done = state.done;
        drop(state);
        inner.changed.notify_all();
        if done {
            return;
        }
    }
}

/// POSTs one batch; the status and, on success, the receipt.
fn post(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&str>,
    lines: Vec<LogLine>,
    timeout: Duration,
) -> Result<(u16, Option<LogReceipt>), String> {
    let body = serde_json::to_vec(&LogBatch { lines }).map_err(|e| e.to_string())?;
    let mut request = agent
        .post(url)
        .config()
        .timeout_global(Some(timeout))
        .build()
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut response = request.send(&body[..]).map_err(|e| e.to_string())?;
    let text = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_vec()
        .unwrap_or_default();
    let receipt = serde_json::from_slice(&text).ok();
    Ok((response.status().as_u16(), receipt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutter_splits_lines_across_chunks_and_strips_cr() {
        let mut c = LineCutter::default();
        assert!(c.push(b"hel").is_empty());
        assert_eq!(c.push(b"lo\r\nwor"), ["hello"]);
        assert_eq!(c.push(b"ld\n\n"), ["world", ""]);
        assert_eq!(c.finish(), None);
        assert!(c.push(b"tail").is_empty());
        assert_eq!(c.finish().as_deref(), Some("tail"));
    }

    #[test]
    fn cutter_cuts_long_lines_with_a_marker_and_keeps_going() {
        let mut c = LineCutter::default();
        let mut long = vec![b'x'; MAX_LINE_BYTES + 100];
        long.extend_from_slice(b"\nnext\n");
        let lines = c.push(&long);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(&"x".repeat(MAX_LINE_BYTES)));
        assert!(
            lines[0].ends_with("[agent-bus: line cut at 16384 bytes, 100 more bytes not kept]"),
            "{}",
            &lines[0][MAX_LINE_BYTES..]
        );
        assert_eq!(lines[1], "next");
        // A long line arriving in small chunks never holds more than the cap.
        let mut c = LineCutter::default();
        for _ in 0..1000 {
            assert!(c.push(&[b'y'; 1000]).is_empty());
            assert!(c.partial.len() <= MAX_LINE_BYTES);
        }
        assert!(c.finish().unwrap().contains("983616 more bytes"));
    }

    #[test]
    fn cutter_replaces_invalid_utf8() {
        let mut c = LineCutter::default();
        assert_eq!(c.push(b"ok \xff\xfe done\n"), ["ok \u{fffd}\u{fffd} done"]);
    }

    fn texts(b: &LogBuffer) -> Vec<(u64, String)> {
        b.lines
            .iter()
            .map(|l| (l.sequence, l.line.clone()))
            .collect()
    }

    #[test]
    fn buffer_numbers_lines_in_order() {
        let mut b = LogBuffer::new(1 << 20, 1000);
        b.push(LogStream::Stdout, "t", "a".into());
        b.push(LogStream::Stderr, "t", "b".into());
        assert_eq!(texts(&b), [(1000, "a".into()), (1001, "b".into())]);
        assert_eq!(b.lines[1].stream, LogStream::Stderr);
    }

    #[test]
    fn a_full_buffer_drops_new_lines_and_marks_the_gap() {
        let limit = 10 * (10 + LINE_OVERHEAD) + MARKER_ROOM;
        let mut b = LogBuffer::new(limit, 1);
        for i in 0..20 {
            b.push(LogStream::Stdout, "t", format!("line {i:>5}"));
        }
        assert!(b.bytes() <= limit);
        let kept = texts(&b).len();
        assert!(kept < 20);
        assert_eq!(b.undelivered(), 20);
        // Delivery makes room: the marker comes first, then the new line.
        b.remove_front(kept, false);
        b.push(LogStream::Stdout, "t", "after".into());
        let after = texts(&b);
        assert_eq!(after.len(), 2);
        assert!(
            after[0]
                .1
                .contains(&format!("{} lines ({} bytes)", 20 - kept, (20 - kept) * 10)),
            "{after:?}"
        );
        assert_eq!(after[1].1, "after");
        assert!(after[0].0 < after[1].0);
        assert_eq!(b.undelivered(), (20 - kept) as u64 + 2);
    }

    #[test]
    fn a_gap_at_the_end_gets_its_marker_at_the_flush() {
        let mut b = LogBuffer::new(LINE_OVERHEAD + 4, 1);
        b.push(LogStream::Stdout, "t", "keep".into());
        b.push(LogStream::Stdout, "t", "lost".into());
        b.close_gap("t");
        let lines = texts(&b);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].1.contains("1 lines (4 bytes)"));
    }

    #[test]
    fn batches_are_bounded_in_bytes_and_lines() {
        let mut b = LogBuffer::new(usize::MAX, 1);
        for _ in 0..100 {
            b.push(LogStream::Stdout, "t", "z".repeat(1000));
        }
        let batch = b.batch();
        assert!(batch.len() < 100);
        assert!(batch.iter().map(cost).sum::<usize>() <= BATCH_BYTES);
        let mut b = LogBuffer::new(usize::MAX, 1);
        for _ in 0..5000 {
            b.push(LogStream::Stdout, "t", String::new());
        }
        assert_eq!(b.batch().len(), MAX_BATCH_LINES);
        // One line larger than a batch still goes, alone.
        let mut b = LogBuffer::new(usize::MAX, 1);
        b.push(LogStream::Stdout, "t", "w".repeat(BATCH_BYTES * 2));
        assert_eq!(b.batch().len(), 1);
    }

    #[test]
    fn disabled_shipper_owes_nothing() {
        let s = Shipper::disabled();
        s.push(LogStream::Stdout, vec!["x".into()]);
        assert_eq!(s.flush(Duration::from_millis(1)), 0);
    }

    #[test]
    fn unreachable_dispatcher_gives_up_at_the_flush_deadline() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = Shipper::start(format!("http://127.0.0.1:{port}/logs"), None, 1 << 20, 1);
        s.push(LogStream::Stdout, vec!["a".into(), "b".into()]);
        let start = Instant::now();
        assert_eq!(s.flush(Duration::from_millis(500)), 2);
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
