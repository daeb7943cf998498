//! One run of the command, start to finish: spawn, the event loop (signals, timeout,
//! heartbeats, the report file, GPU discovery), then the finished report, the bounded
//! final flush and the termination summary. Nothing here can change the command's exit
//! code or hold the command up: reports and GPU figures are best effort.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use protocol::{
    Finished, GpuDevice, Heartbeat, Outcome, Report, ReportBody, Started, TerminationSummary,
    Usage, env,
};

use crate::child::{self, EnvChanges, Exit};
use crate::classify::{self, Observations};
use crate::config::RunArgs;
use crate::gpu::{self, Found};
use crate::lines::{Line, LineError, Tailer};
use crate::output::{self, Stream};
use crate::sender::{Sender, Target};

/// How often the report file is read.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long the started report waits for GPU discovery (the command runs meanwhile).
const GPU_DISCOVERY_WAIT: Duration = Duration::from_secs(5);
/// How long the runner waits for the command's output to close after it exited (a
/// background process may keep the pipes open).
const OUTPUT_DRAIN_WAIT: Duration = Duration::from_secs(1);
/// The termination-message path Kubernetes provides in every container.
const DEFAULT_TERMINATION_LOG: &str = "/dev/termination-log";

/// What the event loop is told.
#[derive(Debug)]
enum Event {
    Signal(Signal),
    Exited(Exit),
    Gpu(Found),
}

/// Numbers reports and hands them to the sender; sums usage for the summary.
#[derive(Debug)]
struct Reports {
    sender: Sender,
    /// This process's first sequence number.
    first_sequence: u64,
    last_sequence: u64,
    usage: BTreeMap<String, Usage>,
}

impl Reports {
    fn send(&mut self, body: ReportBody) {
        if let ReportBody::Usage(u) = &body {
            let total = self.usage.entry(u.model.clone()).or_insert_with(|| Usage {
                model: u.model.clone(),
                ..Usage::default()
            });
            total.calls += u.calls;
            total.input_tokens += u.input_tokens;
            total.output_tokens += u.output_tokens;
            total.cost_usd += u.cost_usd;
        }
        self.last_sequence += 1;
        self.sender.push(Report {
            sequence: self.last_sequence,
            sent_at: format!("{:.3}", jiff::Timestamp::now()),
            body,
        });
    }
}

/// Malformed-line warnings: at most 10 a minute, the rest counted.
#[derive(Debug)]
struct WarnLimit {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl WarnLimit {
    const PER_MINUTE: u32 = 10;

    fn new() -> Self {
        Self {
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    fn warn(&mut self, path: &Path, error: &LineError) {
        if self.window_start.elapsed() >= Duration::from_mins(1) {
            self.window_start = Instant::now();
            self.in_window = 0;
        }
        if self.in_window >= Self::PER_MINUTE {
            self.suppressed += 1;
            return;
        }
        self.in_window += 1;
        let skipped = std::mem::take(&mut self.suppressed);
        let more = if skipped > 0 {
            format!(" ({skipped} more malformed lines were skipped without a warning)")
        } else {
            String::new()
        };
        crate::log!(
            "{}: skipped a malformed line: {error}{more}",
            path.display()
        );
    }
}

/// The line-protocol file of this run.
#[derive(Debug)]
struct ReportFile {
    path: PathBuf,
    /// Created by the runner in the temp folder: removed at exit.
    owned: bool,
    tailer: Tailer,
}

impl ReportFile {
    /// The given file (kept, read from its current end) or a fresh one in the temp folder.
    fn prepare(given: Option<PathBuf>) -> Option<Self> {
        if let Some(path) = given {
            match OpenOptions::new().create(true).append(true).open(&path) {
                Ok(file) => {
                    let offset = file.metadata().map_or(0, |m| m.len());
                    return Some(Self {
                        tailer: Tailer::new(path.clone(), offset),
                        path,
                        owned: false,
                    });
                }
                Err(e) => crate::log!("report file {}: {e}; using a temporary one", path.display()),
            }
        }
        let dir = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut last_error = None;
        for attempt in 0..5_u32 {
            let name = format!(
                "agent-bus-report-{}-{nanos:x}-{attempt}",
                std::process::id()
            );
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => {
                    return Some(Self {
                        tailer: Tailer::new(path.clone(), 0),
                        path,
                        owned: true,
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            crate::log!(
                "no report file in {}: {e}; progress and usage lines are off",
                dir.display()
            );
        }
        None
    }
}

/// Runs the command described by `args`; returns the runner's exit code.
pub fn run(args: &RunArgs) -> u8 {
    let sender = match &args.report_url {
        Some(url) if !url.is_empty() => Sender::start(
            Target {
                url: url.clone(),
                token: args.report_token.clone().filter(|t| !t.is_empty()),
            },
            args.buffer_limit,
        ),
        _ => {
            crate::log!(
                "no report URL ({} unset): running without reports",
                env::REPORT_URL
            );
            Sender::disabled()
        }
    };
    // A replacement pod of the same attempt numbers its reports apart from this one's.
    let first_sequence = protocol::first_sequence(jiff::Timestamp::now().as_millisecond());
    let mut reports = Reports {
        sender,
        first_sequence,
        last_sequence: first_sequence - 1,
        usage: BTreeMap::new(),
    };
    let (events, received) = mpsc::channel::<Event>();

    // Handlers first, so a signal arriving while the command starts is still forwarded.
    if let Err(e) = child::catch_signals(child::to_channel(events.clone(), Event::Signal)) {
        crate::log!("signals are not forwarded: {e}");
    }
    let mut report_file = ReportFile::prepare(args.report_file.clone());
    let oom_kills_before = classify::current_oom_kill_count();

    let mut env_changes = EnvChanges {
        remove: vec![env::REPORT_TOKEN],
        set: Vec::new(),
    };
    match &report_file {
        Some(f) => env_changes
            .set
            .push((env::REPORT_FILE, OsString::from(&f.path))),
        None => env_changes.remove.push(env::REPORT_FILE),
    }
    let spawned = child::spawn(&args.command, &env_changes);
    let spawned_at = Instant::now();
    let spawned = match spawned {
        Ok(spawned) => spawned,
        Err(e) => {
            crate::log!("{e}");
            let exit_code = e.exit_code;
            let outcome = Outcome {
                exit_code,
                failure_class: Some(protocol::FailureClass::UserError),
                stderr_tail: Some(e.to_string()),
                ..Outcome::default()
            };
            reports.send(ReportBody::Finished(Finished {
                outcome: outcome.clone(),
                ..Finished::default()
            }));
            let summary = TerminationSummary {
                v: 1,
                outcome,
                ..TerminationSummary::default()
            };
            finish(args, &reports, summary, report_file.as_ref());
            return exit_code as u8;
        }
    };
    let pid = spawned.pid;
    // NVML starts after the command, in parallel: it never delays the command.
    let gpu = (!args.gpu_sample_seconds.is_zero()).then(|| {
        gpu::Monitor::start(
            args.nvml_library.clone(),
            args.gpu_sample_seconds,
            child::to_channel(events.clone(), Event::Gpu),
        )
    });

    let shared = Arc::new(output::Shared {
        logs: log_shipper(args, first_sequence),
        ..output::Shared::default()
    });
    let copies: Vec<_> = [
        output::spawn_copy(spawned.stdout, Stream::Stdout, Arc::clone(&shared)),
        output::spawn_copy(spawned.stderr, Stream::Stderr, Arc::clone(&shared)),
    ]
    .into_iter()
    .filter_map(|c| {
        c.map_err(|e| crate::log!("cannot copy the command's output: {e}"))
            .ok()
    })
    .collect();
    let reap_all = nix::unistd::getpid().as_raw() == 1;
    let waiter = child::spawn_waiter(pid, reap_all, child::to_channel(events, Event::Exited));
    let mut exit = None;
    if let Err(e) = waiter {
        // Without the wait thread nothing would notice the end: wait here instead, with
        // no forwarding, timeout or heartbeat.
        crate::log!("cannot start the wait thread: {e}; waiting without supervision");
        exit = Some(child::wait_now(pid));
    }

    // The event loop: runs until the command ended.
    let mut devices: Option<Vec<GpuDevice>> = gpu.is_none().then(Vec::new);
    let started_by = spawned_at + GPU_DISCOVERY_WAIT;
    let mut started = false;
    let heartbeat_every = (!args.heartbeat_seconds.is_zero()).then_some(args.heartbeat_seconds);
    let mut next_heartbeat = None;
    let mut next_poll = spawned_at;
    let mut timeout_at =
        (!args.timeout_seconds.is_zero()).then(|| spawned_at + args.timeout_seconds);
    let mut kill_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut signal_forwarded = false;
    let mut warnings = WarnLimit::new();

    let exit = loop {
        if let Some(exit) = exit.take() {
            break exit;
        }
        let now = Instant::now();
        if !started && (devices.is_some() || now >= started_by) {
            send_started(&mut reports, devices.clone().unwrap_or_default());
            started = true;
            next_heartbeat = heartbeat_every.map(|every| now + every);
        }
        if started && now >= next_poll {
            poll_report_file(report_file.as_mut(), &mut reports, &mut warnings);
            next_poll = now + POLL_INTERVAL;
        }
        if let (Some(at), Some(every)) = (next_heartbeat, heartbeat_every)
            && now >= at
        {
            reports.send(ReportBody::Heartbeat(Heartbeat {
                uptime_seconds: spawned_at.elapsed().as_secs_f64(),
                gpus: gpu.as_ref().map(gpu::Monitor::latest).unwrap_or_default(),
            }));
            next_heartbeat = Some(now + every);
        }
        if timeout_at.is_some_and(|at| now >= at) {
            crate::log!(
                "timeout of {}s reached: sending SIGTERM to the command",
                args.timeout_seconds.as_secs_f64()
            );
            child::signal_group(pid, Signal::SIGTERM);
            timed_out = true;
            timeout_at = None;
            kill_at.get_or_insert(now + args.grace_seconds);
        }
        if kill_at.is_some_and(|at| now >= at) {
            crate::log!(
                "grace period of {}s over: sending SIGKILL to the command",
                args.grace_seconds.as_secs_f64()
            );
            child::signal_group(pid, Signal::SIGKILL);
            kill_at = None;
        }

        let wake = [
            (!started).then_some(started_by),
            started.then_some(next_poll),
            next_heartbeat,
            timeout_at,
            kill_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + POLL_INTERVAL);
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match received.recv_timeout(wait) {
            Ok(Event::Exited(exit)) => break exit,
            Ok(Event::Signal(signal)) => {
                child::signal_group(pid, signal);
                if matches!(
                    signal,
                    Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP | Signal::SIGQUIT
                ) {
                    signal_forwarded = true;
                }
                if matches!(signal, Signal::SIGTERM | Signal::SIGINT) {
                    kill_at.get_or_insert(Instant::now() + args.grace_seconds);
                }
            }
            Ok(Event::Gpu(found)) => devices = Some(found.into_devices()),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // No waiter thread: nothing can tell us the command ended.
                crate::log!("lost track of the command");
                break Exit {
                    exit_code: None,
                    signal: None,
                    at: Instant::now(),
                    max_rss_bytes: None,
                    cpu_seconds: None,
                };
            }
        }
    };

    if !started {
        // The command was quick: give GPU discovery the rest of its time, so the started
        // report lists the GPUs and a missing NVML is logged, every time.
        while devices.is_none() {
            let left = started_by.saturating_duration_since(Instant::now());
            match received.recv_timeout(left) {
                Ok(Event::Gpu(found)) => devices = Some(found.into_devices()),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        send_started(&mut reports, devices.unwrap_or_default());
    }
    // The command's output up to its end, unless a background process holds the pipes.
    let drain_by = Instant::now() + OUTPUT_DRAIN_WAIT;
    while copies.iter().any(|c| !c.is_finished()) && Instant::now() < drain_by {
        std::thread::sleep(Duration::from_millis(10));
    }
    poll_report_file(report_file.as_mut(), &mut reports, &mut warnings);
    // Every line before `finished`: a task seen ended has its output stored. Half the
    // final flush time at most, so the reports keep theirs.
    let undelivered_lines = shared.logs.flush(args.final_flush_seconds / 2);
    if undelivered_lines > 0 {
        crate::log!("{undelivered_lines} output lines were not delivered to the dispatcher");
    }
    let stats = gpu.map(gpu::Monitor::finish);
    let oom_kills_after = classify::current_oom_kill_count();

    let observations = Observations {
        exit_code: exit.exit_code,
        signal: exit.signal,
        timed_out,
        gpu_xid: stats.as_ref().is_some_and(gpu::Stats::xid_seen),
        cuda_oom: shared.cuda_oom_seen(),
        oom_kills_grew: classify::grew(oom_kills_before, oom_kills_after),
        signal_forwarded,
    };
    let failure_class = classify::classify(&observations);
    let exit_code = observations.exit_code();
    let duration_seconds = exit.at.duration_since(spawned_at).as_secs_f64();
    let gpu_summary = stats.as_ref().and_then(gpu::Stats::summary);
    let stderr_tail = shared.stderr_tail();
    let outcome = Outcome {
        exit_code,
        signal: exit.signal,
        failure_class,
        duration_seconds,
        gpu: gpu_summary,
        stderr_tail,
    };
    reports.send(ReportBody::Finished(Finished {
        outcome: outcome.clone(),
        max_rss_bytes: exit.max_rss_bytes,
        cpu_seconds: exit.cpu_seconds,
    }));
    let summary = TerminationSummary {
        v: 1,
        outcome,
        usage: Vec::new(),
        undelivered_reports: 0,
        first_sequence: 0,
    };
    finish(args, &reports, summary, report_file.as_ref());
    (exit_code & 0xff) as u8
}

/// The shipper of the command's output lines: to the attempt's `/logs`, the sibling of
/// its report URL, with the same token; none without a report URL.
fn log_shipper(args: &RunArgs, first_sequence: u64) -> crate::logs::Shipper {
    match args.report_url.as_deref().and_then(protocol::log_url) {
        Some(url) => crate::logs::Shipper::start(
            url,
            args.report_token.clone().filter(|t| !t.is_empty()),
            args.log_buffer_bytes,
            first_sequence,
        ),
        None => crate::logs::Shipper::disabled(),
    }
}

fn send_started(reports: &mut Reports, gpus: Vec<GpuDevice>) {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok());
    reports.send(ReportBody::Started(Started {
        hostname,
        runner_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        gpus,
    }));
}

fn poll_report_file(file: Option<&mut ReportFile>, reports: &mut Reports, warn: &mut WarnLimit) {
    let Some(file) = file else {
        return;
    };
    for line in file.tailer.poll() {
        match line {
            Ok(Line::Progress(p)) => reports.send(ReportBody::Progress(p)),
            Ok(Line::Usage(u)) => reports.send(ReportBody::Usage(u)),
            Err(e) => warn.warn(&file.path, &e),
        }
    }
}

/// The end of every run: the bounded flush, the termination summary, the report file.
fn finish(
    args: &RunArgs,
    reports: &Reports,
    mut summary: TerminationSummary,
    report_file: Option<&ReportFile>,
) {
    let undelivered = reports.sender.flush(args.final_flush_seconds);
    if undelivered > 0 {
        crate::log!("{undelivered} reports were not delivered");
    }
    summary.undelivered_reports = undelivered;
    summary.usage = reports.usage.values().cloned().collect();
    summary.first_sequence = reports.first_sequence;
    write_termination_log(args.termination_log.as_deref(), &summary.to_message());
    if let Some(file) = report_file.filter(|f| f.owned) {
        let _ = std::fs::remove_file(&file.path);
    }
}

/// Writes the summary; the default path only if it exists (Kubernetes creates it), so a
/// local run never litters /dev.
fn write_termination_log(path: Option<&Path>, message: &str) {
    let (path, create) = match path {
        Some(path) => (path, true),
        None => (Path::new(DEFAULT_TERMINATION_LOG), false),
    };
    let written = OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(create)
        .open(path)
        .and_then(|mut f| f.write_all(message.as_bytes()));
    match written {
        Ok(()) => {}
        // Outside Kubernetes the default path is absent: nothing to say.
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => crate::log!("termination log {} not written: {e}", path.display()),
    }
}
