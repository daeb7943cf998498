//! Test support: the built runner as a process, and a fake report receiver.
//!
//! Everything waits with deadlines (`wait_until`), never with a fixed sleep, so a loaded
//! two-core machine makes the tests slower, not flaky.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::{Finished, LogBatch, LogLine, Report, ReportBatch, ReportBody, TerminationSummary};

/// How long any single condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `condition` every 20 ms until it holds; panics with `what` after `within`.
pub fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh folder under the temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("runner-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A runner invocation under construction: `Runner::new().arg(..).cmd(["sh", "-c", ".."])`.
pub struct Runner {
    command: Command,
    pub dir: TempDir,
    termination_log: PathBuf,
    user_command: Vec<String>,
}

impl Runner {
    /// The built runner with a clean environment of `AGENT_BUS_*` variables, no NVML (a
    /// library path that does not exist), and its termination log in a temp folder.
    pub fn new() -> Self {
        let dir = TempDir::new("run");
        let mut command = Command::new(env!("CARGO_BIN_EXE_runner"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("AGENT_BUS_") {
                command.env_remove(name);
            }
        }
        command.env("AGENT_BUS_NVML_LIBRARY", "/nonexistent/libnvidia-ml.so.1");
        Self {
            command,
            termination_log: dir.path("termination-log"),
            dir,
            user_command: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(mut self, args: I) -> Self {
        self.command.args(args);
        self
    }

    pub fn env(mut self, name: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.env(name, value);
        self
    }

    /// Runs the runner (and so the command) as the unprivileged user 65534 when the tests
    /// run as root, so the command has no capability that would let it past the checks
    /// the kernel makes between two processes of one user (ptrace access). Without
    /// root, the tests' own user is already such a user.
    pub fn unprivileged(mut self) -> Self {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        use std::os::unix::process::CommandExt as _;
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if root {
            // The runner writes its termination log into the temp folder.
            std::fs::set_permissions(&self.dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
            // The build may sit where user 65534 cannot pass (CI keeps it under root's
            // 0700 home): that user runs a copy in the temp folder, with the same
            // arguments and environment.
            let copy = self.dir.path("runner");
            std::fs::copy(env!("CARGO_BIN_EXE_runner"), &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
            let mut command = Command::new(&copy);
            command.args(self.command.get_args());
            for (name, value) in self.command.get_envs() {
                match value {
                    Some(value) => command.env(name, value),
                    None => command.env_remove(name),
                };
            }
            command.uid(65534).gid(65534);
            self.command = command;
        }
        self
    }

    /// Somewhere else than the temp folder's `termination-log`.
    pub fn termination_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.termination_log = path.into();
        self
    }

    pub fn report_to(self, receiver: &Receiver) -> Self {
        self.env("AGENT_BUS_REPORT_URL", receiver.url())
            .env("AGENT_BUS_REPORT_TOKEN", "secret-token")
    }

    /// The command to run, after `--`.
    pub fn cmd<I: IntoIterator<Item = S>, S: Into<String>>(mut self, command: I) -> Self {
        self.user_command = command.into_iter().map(Into::into).collect();
        self
    }

    /// `sh -c script`.
    pub fn sh(self, script: &str) -> Self {
        self.cmd(["/bin/sh", "-c", script])
    }

    pub fn spawn(mut self) -> Running {
        self.command
            .arg("--termination-log")
            .arg(&self.termination_log)
            .arg("--")
            .args(&self.user_command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.command.spawn().unwrap();
        let stdout = Collector::start(child.stdout.take().unwrap());
        let stderr = Collector::start(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
            dir: self.dir,
            started: Instant::now(),
        }
    }

    /// Runs to the end (within [`DEADLINE`]).
    pub fn run(self) -> Outcome {
        self.spawn().wait()
    }
}

/// Reads a pipe to its end on a thread, keeping everything.
pub struct Collector {
    bytes: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    fn start(mut source: impl Read + Send + 'static) -> Self {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0_u8; 64 * 1024];
            loop {
                match source.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        Self {
            bytes,
            thread: Some(thread),
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }

    fn finish(mut self) -> Vec<u8> {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.bytes.lock().unwrap())
    }
}

/// A runner still running.
pub struct Running {
    pub child: Child,
    pub stdout: Collector,
    pub stderr: Collector,
    pub dir: TempDir,
    pub started: Instant,
}

impl Running {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Waits until the command printed `text` on stdout.
    pub fn wait_for_stdout(&self, text: &str) {
        wait_until(&format!("{text:?} on stdout"), DEADLINE, || {
            self.stdout.text().contains(text)
        });
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).unwrap();
    }

    pub fn wait(mut self) -> Outcome {
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "runner did not end within {DEADLINE:?}; stderr so far:\n{}",
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        Outcome {
            status,
            elapsed,
            stdout: self.stdout.finish(),
            stderr: self.stderr.finish(),
            dir: self.dir,
        }
    }
}

/// A finished runner.
pub struct Outcome {
    pub status: ExitStatus,
    pub elapsed: Duration,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub dir: TempDir,
}

impl Outcome {
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("runner itself ended by a signal: {:?}", self.status))
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The runner's own log lines.
    pub fn log_lines(&self) -> Vec<String> {
        self.stderr()
            .lines()
            .filter(|l| l.starts_with("runner:"))
            .map(str::to_owned)
            .collect()
    }

    pub fn termination(&self) -> TerminationSummary {
        let text = std::fs::read_to_string(self.dir.path("termination-log"))
            .unwrap_or_else(|e| panic!("no termination log ({e}); stderr:\n{}", self.stderr()));
        TerminationSummary::from_message(&text)
            .unwrap_or_else(|| panic!("not a termination summary: {text}"))
    }
}

/// How the fake receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
}

/// One POST the receiver got.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub authorization: Option<String>,
    pub status: u16,
    /// `None` when the body was not a report batch.
    pub batch: Option<ReportBatch>,
    /// The body of a POST to the `/logs` sibling route.
    pub logs: Option<LogBatch>,
}

impl Request {
    fn is_logs(&self) -> bool {
        self.path.ends_with("/logs")
    }
}

#[derive(Debug)]
struct ReceiverState {
    answer: Answer,
    requests: Vec<Request>,
}

/// A minimal HTTP/1.1 server on 127.0.0.1 that records report batches.
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    /// Listening now, answering 200.
    pub fn start() -> Self {
        Self::listen(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// A port nothing listens on yet (connections are refused until [`Receiver::start_on`]).
    pub fn reserve_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Comes up late, on a port reserved earlier.
    pub fn start_on(port: u16) -> Self {
        Self::listen(TcpListener::bind(("127.0.0.1", port)).unwrap())
    }

    pub fn url_for_port(port: u16) -> String {
        format!("http://127.0.0.1:{port}/internal/v1/tasks/t-1/attempts/1/reports")
    }

    fn listen(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ReceiverState {
            answer: Answer::Status(200),
            requests: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stopping) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || serve(conn, &shared));
            }
        });
        Self { addr, state, stop }
    }

    pub fn url(&self) -> String {
        Self::url_for_port(self.addr.port())
    }

    pub fn answer(&self, answer: Answer) {
        self.state.lock().unwrap().answer = answer;
    }

    /// The POSTs of reports (not of output lines), in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.all_requests()
            .into_iter()
            .filter(|r| !r.is_logs())
            .collect()
    }

    /// Every POST, reports and output lines, in arrival order.
    pub fn all_requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Every output line of every accepted (2xx) `/logs` batch, in arrival order.
    pub fn shipped(&self) -> Vec<LogLine> {
        self.all_requests()
            .into_iter()
            .filter(|r| r.is_logs() && (200..300).contains(&r.status))
            .filter_map(|r| r.logs)
            .flat_map(|b| b.lines)
            .collect()
    }

    /// Every report of every accepted (2xx) batch, in arrival order.
    pub fn delivered(&self) -> Vec<Report> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .filter_map(|r| r.batch)
            .flat_map(|b| b.reports)
            .collect()
    }

    pub fn wait_for(&self, what: &str, condition: impl Fn(&[Report]) -> bool) {
        wait_until(what, DEADLINE, || condition(&self.delivered()));
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(conn: TcpStream, state: &Mutex<ReceiverState>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let mut length = 0;
        let mut authorization = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "authorization" => authorization = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let status = {
            let mut state = state.lock().unwrap();
            let Answer::Status(status) = state.answer;
            state.requests.push(Request {
                path,
                authorization,
                status,
                batch: serde_json::from_slice(&body).ok(),
                logs: serde_json::from_slice(&body).ok(),
            });
            status
        };
        let response =
            format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n");
        if writer.write_all(response.as_bytes()).is_err() {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// The kinds of reports, in order: `["started", "progress", …]`.
pub fn kinds(reports: &[Report]) -> Vec<&'static str> {
    reports
        .iter()
        .map(|r| match r.body {
            ReportBody::Started(_) => "started",
            ReportBody::Heartbeat(_) => "heartbeat",
            ReportBody::Progress(_) => "progress",
            ReportBody::Usage(_) => "usage",
            ReportBody::Finished(_) => "finished",
        })
        .collect()
}

/// The finished report among `reports`.
pub fn finished(reports: &[Report]) -> Finished {
    reports
        .iter()
        .find_map(|r| match &r.body {
            ReportBody::Finished(f) => Some(f.clone()),
            _ => None,
        })
        .expect("a finished report")
}

/// Reports by sequence, checking that a sequence received twice is the same report
/// both times; returns them sorted and unique.
pub fn unique_by_sequence(reports: &[Report]) -> Vec<Report> {
    let mut by_seq = std::collections::BTreeMap::new();
    for r in reports {
        if let Some(previous) = by_seq.insert(r.sequence, r.clone()) {
            assert_eq!(
                &previous, r,
                "sequence {} delivered as two different reports",
                r.sequence
            );
        }
    }
    by_seq.into_values().collect()
}

/// A shell script snippet that waits until `path` exists (the test's go-ahead).
pub fn wait_for_file(path: &Path) -> String {
    format!("while [ ! -e '{}' ]; do sleep 0.05; done", path.display())
}

/// The fake library, built once per test binary; `None` (the test skips with one line)
/// without a C compiler, a failure then under `make test` (see `testsupport::needs_env!`).
pub fn fake_nvml() -> Option<PathBuf> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if !testsupport::environment_present(&[testsupport::Need::Program("cc")]) {
        return None;
    }
    let lib = BUILT.get_or_init(|| {
        // Under the target folder (not the temp dir): nothing to clean up by hand.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fake-nvml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lib = dir.join("libnvidia-ml.so.1");
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake_nvml/fake_nvml.c");
        let built = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&lib)
            .arg(source)
            .status();
        assert!(
            built.as_ref().is_ok_and(std::process::ExitStatus::success),
            "cannot build the fake NVML with cc: {built:?}"
        );
        lib
    });
    Some(lib.clone())
}
