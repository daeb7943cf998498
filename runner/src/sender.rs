//! Delivery of reports to the dispatcher: a bounded buffer the run pushes into without
//! ever waiting, and a thread that POSTs it in batches with retries and backoff.
//!
//! - 2xx: the batch is delivered and dropped from the buffer;
//! - 401, 403, 404, 409: the token or the attempt is not accepted (409: the attempt has
//!   ended), which will not get better: one log line, everything buffered and
//!   everything later is dropped;
//! - 429: the attempt used up its allowance of reports: the batch's heartbeats,
//!   progress and usage are dropped (the usage still reaches the termination summary),
//!   its started and finished reports are kept and retried after a backoff;
//! - any other 4xx but 408 (a 422, say): that batch is dropped, one log line;
//! - connection errors, 5xx, 408: the batch stays and is retried after a backoff
//!   (200 ms doubling to 10 s, with jitter, or the server's `Retry-After` up to 10 s).
//!
//! When the buffer is full the oldest heartbeat goes first, then the oldest progress;
//! started, finished and usage reports are never dropped for space.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use protocol::{Report, ReportBatch, ReportBody};

/// Reports per POST.
pub const BATCH_SIZE: usize = 200;
/// First retry delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest single request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Reports waiting for delivery, bounded by dropping the least valuable first.
#[derive(Debug)]
pub struct Buffer {
    items: VecDeque<Report>,
    limit: usize,
    /// Reports dropped for space or refused by the dispatcher.
    dropped: u64,
}

fn evictable_rank(body: &ReportBody) -> Option<u8> {
    match body {
        ReportBody::Heartbeat(_) => Some(0),
        ReportBody::Progress(_) => Some(1),
        ReportBody::Started(_) | ReportBody::Usage(_) | ReportBody::Finished(_) => None,
    }
}

impl Buffer {
    #[must_use]
    pub fn new(limit: usize) -> Self {
        Self {
            items: VecDeque::new(),
            limit: limit.max(1),
            dropped: 0,
        }
    }

    /// Adds a report; when full, drops the oldest heartbeat, else the oldest progress,
    /// else the new report if it is one of those. Started, usage and finished reports
    /// are kept even past the limit.
    pub fn push(&mut self, report: Report) {
        if self.items.len() >= self.limit {
            let victim = [0, 1].into_iter().find_map(|rank| {
                self.items
                    .iter()
                    .position(|r| evictable_rank(&r.body) == Some(rank))
            });
            match victim {
                Some(i) => {
                    self.items.remove(i);
                    self.dropped += 1;
                }
                None if evictable_rank(&report.body).is_some() => {
                    self.dropped += 1;
                    return;
                }
                None => {}
            }
        }
        self.items.push_back(report);
    }

    /// The oldest `max` reports, for the next POST.
    #[must_use]
    pub fn batch(&self, max: usize) -> Vec<Report> {
        self.items.iter().take(max).cloned().collect()
    }

    /// Removes delivered (or refused) reports by sequence; others pushed or evicted
    /// meanwhile are left alone.
    pub fn remove(&mut self, sequences: &[u64]) {
        self.items
            .retain(|r| sequences.binary_search(&r.sequence).is_err());
    }

    /// Drops the reports among `sequences` that may be dropped for space (heartbeats,
    /// progress) and the usage reports among them; how many were dropped.
    pub fn shed(&mut self, sequences: &[u64]) -> u64 {
        let before = self.items.len();
        self.items.retain(|r| {
            sequences.binary_search(&r.sequence).is_err()
                || matches!(r.body, ReportBody::Started(_) | ReportBody::Finished(_))
        });
        let shed = (before - self.items.len()) as u64;
        self.dropped += shed;
        shed
    }

    /// Drops everything, counting it as undelivered.
    pub fn drop_all(&mut self) {
        self.dropped += self.items.len() as u64;
        self.items.clear();
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Reports that will never be delivered: dropped, plus those still waiting.
    #[must_use]
    pub fn undelivered(&self) -> u64 {
        self.dropped + self.items.len() as u64
    }
}

/// The delay before retry number `failures` (1 for the first retry): 200 ms doubling up
/// to 10 s, then scaled into its upper half by `jitter` in `[0, 1)`.
#[must_use]
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let full = BACKOFF_BASE.saturating_mul(1 << exponent).min(BACKOFF_MAX);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// What to do after a response with this status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Keep the batch and try again later.
    Retry,
    /// This batch will never be accepted: drop it.
    DropBatch,
    /// The attempt's allowance of reports is used up: keep only the batch's started and
    /// finished reports, and try those again later.
    Shed,
    /// No report of this attempt will be accepted: stop sending.
    Stop,
}

#[must_use]
pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        401 | 403 | 404 | 409 => Verdict::Stop,
        408 => Verdict::Retry,
        429 => Verdict::Shed,
        400..=499 => Verdict::DropBatch,
        _ => Verdict::Retry,
    }
}

/// A small xorshift for jitter; quality hardly matters, independence between runners does.
#[derive(Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self(u64::from(nanos) ^ (u64::from(std::process::id()) << 32) | 1)
    }

    pub(crate) fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1_u64 << 53) as f64
    }
}

#[derive(Debug)]
struct State {
    buffer: Buffer,
    /// Set at exit: deliver what is left until then.
    flush_by: Option<Instant>,
    /// The sender stopped (refused for good, or finished flushing).
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

/// The run's side of the sender: push reports, flush at exit.
#[derive(Debug, Clone)]
pub struct Sender {
    inner: Option<Arc<Inner>>,
}

/// Where and how reports are POSTed.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub token: Option<String>,
}

impl Sender {
    /// A sender that drops everything (no report URL).
    #[must_use]
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Starts the sending thread.
    #[must_use]
    pub fn start(target: Target, limit: usize) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                buffer: Buffer::new(limit),
                flush_by: None,
                done: false,
            }),
            changed: Condvar::new(),
        });
        let shared = Arc::clone(&inner);
        let spawned = std::thread::Builder::new()
            .name("report-sender".into())
            .spawn(move || send_loop(&target, &shared));
        match spawned {
            Ok(_) => Self { inner: Some(inner) },
            Err(e) => {
                crate::log!("reports disabled: cannot start the sender thread: {e}");
                Self::disabled()
            }
        }
    }

    /// Queues a report; never blocks on the network.
    pub fn push(&self, report: Report) {
        if let Some(inner) = &self.inner {
            let mut state = inner.lock();
            if state.done {
                state.buffer.dropped += 1;
            } else {
                state.buffer.push(report);
            }
            drop(state);
            inner.changed.notify_all();
        }
    }

    /// Waits until everything is delivered or `within` passed; returns how many reports
    /// were not delivered (0 without a report URL).
    #[must_use]
    pub fn flush(&self, within: Duration) -> u64 {
        let Some(inner) = &self.inner else {
            return 0;
        };
        let deadline = Instant::now() + within;
        let mut state = inner.lock();
        state.flush_by = Some(deadline);
        inner.changed.notify_all();
        state = wait_while(&inner.changed, state, deadline, |state| {
            !state.done && !state.buffer.is_empty()
        });
        state.buffer.undelivered()
    }
}

fn send_loop(target: &Target, inner: &Inner) {
    let agent = report_agent();
    let mut jitter = Jitter::seeded();
    let mut failures: u32 = 0;
    let mut next_try = Instant::now();
    let mut warned_retry = false;
    let mut warned_drop = false;
    let mut warned_shed = false;
    loop {
        // Wait for reports, the end of a backoff, or the flush deadline.
        let (batch, request_timeout) = {
            let mut state = inner.lock();
            loop {
                let now = Instant::now();
                if state.flush_by.is_some_and(|by| now >= by) {
                    state.done = true;
                    inner.changed.notify_all();
                    return;
                }
                if !state.buffer.is_empty() && now >= next_try {
                    break;
                }
                let wake = if state.buffer.is_empty() {
                    state.flush_by
                } else {
                    Some(state.flush_by.map_or(next_try, |by| by.min(next_try)))
                };
                state = wait_for_change(&inner.changed, state, wake, now);
            }
            let timeout = request_timeout(state.flush_by);
            (state.buffer.batch(BATCH_SIZE), timeout)
        };
        let sequences: Vec<u64> = batch.iter().map(|r| r.sequence).collect();
        let outcome = post(&agent, target, batch, request_timeout);
        let mut state = inner.lock();
        match outcome {
            Ok((status, _)) if verdict(status) == Verdict::Delivered => {
                state.buffer.remove(&sequences);
                failures = 0;
                next_try = Instant::now();
                if warned_retry {
                    crate::log!("reports delivered again");
                    warned_retry = false;
                }
            }
            Ok((status, _)) if verdict(status) == Verdict::Stop => {
                crate::log!(
                    "reports refused with HTTP {status}; no further reports are sent for this attempt"
                );
                state.buffer.drop_all();
                state.done = true;
                inner.changed.notify_all();
                return;
            }
            Ok((status, _)) if verdict(status) == Verdict::DropBatch => {
                if !warned_drop {
                    crate::log!(
                        "reports {}..={} refused with HTTP {status}; dropped",
                        sequences.first().copied().unwrap_or_default(),
                        sequences.last().copied().unwrap_or_default()
                    );
                    warned_drop = true;
                }
                state.buffer.dropped += sequences.len() as u64;
                state.buffer.remove(&sequences);
                next_try = Instant::now();
            }
            Ok((status, retry_after)) if verdict(status) == Verdict::Shed => {
                let shed = state.buffer.shed(&sequences);
                if !warned_shed {
                    crate::log!(
                        "reports refused with HTTP {status} (this attempt sent as many as the dispatcher takes); {shed} dropped, started and finished reports are kept"
                    );
                    warned_shed = true;
                }
                failures = failures.saturating_add(1);
                let delay = backoff(failures, jitter.next())
                    .max(retry_after.unwrap_or_default().min(BACKOFF_MAX));
                next_try = Instant::now() + delay;
            }
            other => {
                failures = failures.saturating_add(1);
                let retry_after = match &other {
                    Ok((_, retry_after)) => *retry_after,
                    Err(_) => None,
                };
                let delay = backoff(failures, jitter.next())
                    .max(retry_after.unwrap_or_default().min(BACKOFF_MAX));
                if !warned_retry {
                    let why = match other {
                        Ok((status, _)) => format!("HTTP {status}"),
                        Err(e) => e,
                    };
                    crate::log!("reports not delivered ({why}); retrying with backoff");
                    warned_retry = true;
                }
                next_try = Instant::now() + delay;
            }
        }
        inner.changed.notify_all();
    }
}

/// POSTs one batch; the status and `Retry-After` seconds, or why no response came.
fn post(
    agent: &ureq::Agent,
    target: &Target,
    reports: Vec<Report>,
    timeout: Duration,
) -> Result<(u16, Option<Duration>), String> {
    let body = serde_json::to_vec(&ReportBatch { reports }).map_err(|e| e.to_string())?;
    let mut request = agent
        .post(&target.url)
        .config()
        .timeout_global(Some(timeout))
        .build()
        .header("content-type", "application/json");
    if let Some(token) = &target.token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut response = request.send(&body[..]).map_err(|e| e.to_string())?;
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // Read (and discard) a small body so the connection can be reused.
    let _ = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_vec();
    Ok((response.status().as_u16(), retry_after))
}

/// The HTTP client of the runner's posts to the dispatcher (reports and log lines). No
/// proxy: ureq would take one from ALL_PROXY/HTTP(S)_PROXY, which the task's environment
/// (the tenant's) sets, and the posts carry the report token.
pub(crate) fn report_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(5)))
        .user_agent(concat!("agent-bus-runner/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Sleeps on `changed` while `waiting` holds of the state, until `deadline` at the latest.
pub(crate) fn wait_while<'a, T>(
    changed: &Condvar,
    mut state: MutexGuard<'a, T>,
    deadline: Instant,
    waiting: impl Fn(&T) -> bool,
) -> MutexGuard<'a, T> {
    while waiting(&state) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        state = changed
            .wait_timeout(state, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    state
}

/// Sleeps on `changed` until it is notified or `wake` comes (forever without one), and
/// gives the lock back; a poisoned lock is taken as it is (the state stays consistent:
/// every writer changes it in one step).
pub(crate) fn wait_for_change<'a, T>(
    changed: &Condvar,
    state: MutexGuard<'a, T>,
    wake: Option<Instant>,
    now: Instant,
) -> MutexGuard<'a, T> {
    match wake {
        Some(at) => {
            changed
                .wait_timeout(state, at.saturating_duration_since(now))
                .unwrap_or_else(PoisonError::into_inner)
                .0
        }
        None => changed.wait(state).unwrap_or_else(PoisonError::into_inner),
    }
}

/// How long one request may take: [`REQUEST_TIMEOUT`], or less when the final flush must
/// be over by `flush_by`.
pub(crate) fn request_timeout(flush_by: Option<Instant>) -> Duration {
    flush_by.map_or(REQUEST_TIMEOUT, |by| {
        by.saturating_duration_since(Instant::now())
            .min(REQUEST_TIMEOUT)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Finished, Heartbeat, Progress, Started, Usage};

    fn report(sequence: u64, body: ReportBody) -> Report {
        Report {
            sequence,
            sent_at: String::new(),
            body,
        }
    }
    fn heartbeat(seq: u64) -> Report {
        report(seq, ReportBody::Heartbeat(Heartbeat::default()))
    }
    fn progress(seq: u64) -> Report {
        report(seq, ReportBody::Progress(Progress::default()))
    }
    fn usage(seq: u64) -> Report {
        report(seq, ReportBody::Usage(Usage::default()))
    }
    fn sequences(buffer: &Buffer) -> Vec<u64> {
        buffer.items.iter().map(|r| r.sequence).collect()
    }

    #[test]
    fn full_buffer_drops_oldest_heartbeat_then_progress() {
        let mut b = Buffer::new(4);
        b.push(report(1, ReportBody::Started(Started::default())));
        b.push(progress(2));
        b.push(heartbeat(3));
        b.push(heartbeat(4));
        b.push(usage(5));
        assert_eq!(sequences(&b), [1, 2, 4, 5]);
        b.push(heartbeat(6));
        assert_eq!(sequences(&b), [1, 2, 5, 6]);
        b.push(usage(7));
        assert_eq!(sequences(&b), [1, 2, 5, 7]);
        b.push(usage(8));
        assert_eq!(sequences(&b), [1, 5, 7, 8]);
        assert_eq!(b.undelivered(), 4 + 4);
    }

    #[test]
    fn protected_reports_are_kept_past_the_limit() {
        let mut b = Buffer::new(2);
        b.push(usage(1));
        b.push(usage(2));
        b.push(heartbeat(3));
        assert_eq!(sequences(&b), [1, 2]);
        b.push(report(4, ReportBody::Finished(Finished::default())));
        assert_eq!(sequences(&b), [1, 2, 4]);
        assert_eq!(b.undelivered(), 3 + 1);
    }

    #[test]
    fn remove_takes_only_the_delivered_sequences() {
        let mut b = Buffer::new(10);
        for seq in 1..=5 {
            b.push(heartbeat(seq));
        }
        let batch: Vec<u64> = b.batch(3).iter().map(|r| r.sequence).collect();
        assert_eq!(batch, [1, 2, 3]);
        b.items.remove(1); // evicted while the batch was in flight
        b.remove(&batch);
        assert_eq!(sequences(&b), [4, 5]);
        b.drop_all();
        assert!(b.is_empty());
        assert_eq!(b.undelivered(), 2);
    }

    #[test]
    fn shedding_keeps_started_and_finished_of_the_batch_only() {
        let mut b = Buffer::new(10);
        b.push(report(1, ReportBody::Started(Started::default())));
        b.push(progress(2));
        b.push(usage(3));
        b.push(heartbeat(4));
        b.push(report(5, ReportBody::Finished(Finished::default())));
        b.push(progress(6));
        assert_eq!(b.shed(&[1, 2, 3, 4, 5]), 3);
        assert_eq!(sequences(&b), [1, 5, 6]);
        assert_eq!(b.undelivered(), 3 + 3);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        assert_eq!(backoff(1, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(1, 0.0), Duration::from_millis(100));
        assert_eq!(backoff(2, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(3, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(6, 1.0), Duration::from_millis(6400));
        assert_eq!(backoff(7, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, 0.0), BACKOFF_MAX / 2);
        for failures in 0..20 {
            let d = backoff(failures, 0.3);
            assert!(d > Duration::ZERO && d <= BACKOFF_MAX);
        }
    }

    #[test]
    fn verdicts_by_status() {
        for (status, want) in [
            (200, Verdict::Delivered),
            (204, Verdict::Delivered),
            (401, Verdict::Stop),
            (403, Verdict::Stop),
            (404, Verdict::Stop),
            (409, Verdict::Stop),
            (429, Verdict::Shed),
            (422, Verdict::DropBatch),
            (400, Verdict::DropBatch),
            (408, Verdict::Retry),
            (500, Verdict::Retry),
            (503, Verdict::Retry),
            (302, Verdict::Retry),
        ] {
            assert_eq!(verdict(status), want, "{status}");
        }
    }

    #[test]
    fn jitter_stays_in_range() {
        let mut j = Jitter::seeded();
        for _ in 0..1000 {
            let x = j.next();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn disabled_sender_drops_and_owes_nothing() {
        let s = Sender::disabled();
        s.push(heartbeat(1));
        assert_eq!(s.flush(Duration::from_millis(1)), 0);
    }

    #[test]
    fn unreachable_target_gives_up_at_the_flush_deadline() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = Sender::start(
            Target {
                url: format!("http://127.0.0.1:{port}/reports"),
                token: None,
            },
            10,
        );
        s.push(heartbeat(1));
        s.push(usage(2));
        let start = Instant::now();
        assert_eq!(s.flush(Duration::from_millis(500)), 2);
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
