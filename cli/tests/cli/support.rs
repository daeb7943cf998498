//! A real dispatcher on the embedded defaults (SQLite file, in-process queue, local
//! executor) in a fresh folder, with tenant `acme`, and the `agent-bus` binary run
//! against it with a deadline.
//!
//! The `dispatcher` and `runner` binaries are the ones `cargo test --workspace` builds
//! beside `agent-bus` (a test cannot name another package's binary through
//! `CARGO_BIN_EXE_*`); alone, `cargo build -p dispatcher -p runner` first.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const AGENT_BUS: &str = env!("CARGO_BIN_EXE_agent-bus");

/// How long one CLI run may take before the test fails.
pub(crate) const RUN_DEADLINE: Duration = Duration::from_mins(1);

pub(crate) fn dispatcher_binary() -> PathBuf {
    let binary = Path::new(AGENT_BUS).with_file_name("dispatcher");
    assert!(
        binary.is_file() && binary.with_file_name("runner").is_file(),
        "{} (and the runner beside it) is missing: run these tests with `cargo test \
         --workspace`, or `cargo build -p dispatcher -p runner` first",
        binary.display()
    );
    binary
}

pub(crate) fn scratch_dir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!(
        "agent-bus-cli-{what}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub(crate) struct Dispatcher {
    child: Option<Child>,
    pub(crate) dir: PathBuf,
    pub(crate) base: String,
    pub(crate) key: String,
    listen: String,
    metrics: String,
}

impl Dispatcher {
    /// `dispatcher tenant create acme`, then `dispatcher serve --executor local`, ready.
    pub(crate) fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`Self::start`] with more `serve` flags.
    pub(crate) fn start_with(serve_flags: &[&str]) -> Self {
        let dir = scratch_dir("dispatcher");
        let output = dispatcher_command(&dir)
            .args(["tenant", "create", "acme"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        let port = testsupport::free_port();
        let mut dispatcher = Self {
            child: None,
            base: format!("http://127.0.0.1:{port}"),
            listen: format!("127.0.0.1:{port}"),
            metrics: format!("127.0.0.1:{}", testsupport::free_port()),
            dir,
            key,
        };
        dispatcher.serve(serve_flags);
        dispatcher
    }

    fn serve(&mut self, flags: &[&str]) {
        let child = dispatcher_command(&self.dir)
            .args(["serve", "--executor", "local", "--listen", &self.listen])
            .args(["--metrics-listen", &self.metrics])
            .args(flags)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .new_agent();
        poll_until(
            "the dispatcher to be ready",
            Duration::from_secs(30),
            || match agent.get(format!("http://{}/readyz", self.metrics)).call() {
                Ok(response) if response.status() == 200 => Some(()),
                _ => None,
            },
        );
    }

    /// Kills the dispatcher (as a crash would) and starts it again on the same ports and
    /// database, with `serve_flags`.
    pub(crate) fn restart_with(&mut self, serve_flags: &[&str]) {
        self.kill();
        self.serve(serve_flags);
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `agent-bus --server … --token … ARGS`.
    pub(crate) fn cli(&self, args: &[&str]) -> Command {
        let mut command = cli_command(&self.dir);
        command
            .args(["--server", &self.base, "--token", &self.key])
            .args(args);
        command
    }

    /// Runs `agent-bus ARGS` against this dispatcher.
    pub(crate) fn run(&self, args: &[&str]) -> Ran {
        run(self.cli(args))
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn dispatcher_command(dir: &Path) -> Command {
    let mut command = Command::new(dispatcher_binary());
    command
        .current_dir(dir)
        .env("AGENT_BUS_LOG", "warn")
        .env("DATABASE_URL", "sqlite://agent-bus.db")
        .env_remove("REDIS_URL")
        .env_remove("KUBECONFIG");
    command
}

/// `agent-bus` with none of the caller's settings: no AGENT_BUS_* variables, and a
/// config folder of its own in `dir`.
pub(crate) fn cli_command(dir: &Path) -> Command {
    let mut command = Command::new(AGENT_BUS);
    command
        .current_dir(dir)
        .env_remove("AGENT_BUS_URL")
        .env_remove("AGENT_BUS_TOKEN")
        .env_remove("AGENT_BUS_CONFIG")
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("HOME", dir);
    command
}

/// What a CLI run did.
#[derive(Debug)]
pub(crate) struct Ran {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Ran {
    /// Asserts exit code 0; the standard output.
    pub(crate) fn ok(self) -> String {
        assert_eq!(self.code, 0, "{self:?}");
        self.stdout
    }

    /// Asserts the documented exit `code` and one `agent-bus: error:` line; that line.
    pub(crate) fn error(self, code: i32) -> String {
        assert_eq!(self.code, code, "{self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line of error: {self:?}");
        assert!(
            lines[0].starts_with("agent-bus: error: "),
            "{}",
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        lines[0].to_owned()
    }
}

/// Runs `command` to its end, failing the test after [`RUN_DEADLINE`].
pub(crate) fn run(mut command: Command) -> Ran {
    command.stdin(Stdio::null());
    Spawned::new(command).finish(RUN_DEADLINE)
}

/// A running `agent-bus` whose output is collected as it comes.
pub(crate) struct Spawned {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Spawns `command` with its output piped (and its standard input as set, else
    /// none).
    pub(crate) fn new(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let collect = |pipe: Box<dyn Read + Send>, into: Arc<Mutex<String>>| {
            std::thread::spawn(move || {
                let mut pipe = std::io::BufReader::new(pipe);
                let mut line = String::new();
                while std::io::BufRead::read_line(&mut pipe, &mut line).unwrap_or(0) > 0 {
                    into.lock().unwrap().push_str(&line);
                    line.clear();
                }
            })
        };
        let readers = vec![
            collect(Box::new(child.stdout.take().unwrap()), stdout.clone()),
            collect(Box::new(child.stderr.take().unwrap()), stderr.clone()),
        ];
        Self {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub(crate) fn stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Waits until the standard error so far contains `text`.
    pub(crate) fn await_stderr(&self, text: &str, timeout: Duration) {
        poll_until(
            &format!("'{text}' on agent-bus's standard error"),
            timeout,
            || self.stderr.lock().unwrap().contains(text).then_some(()),
        );
    }

    /// Waits until the standard output so far contains `text`.
    pub(crate) fn await_stdout(&self, text: &str, timeout: Duration) {
        self.await_stdout_count(text, 1, timeout);
    }

    /// Waits until the standard output so far contains `text` `count` times.
    pub(crate) fn await_stdout_count(&self, text: &str, count: usize, timeout: Duration) {
        poll_until(
            &format!("'{text}' {count} times on agent-bus's standard output"),
            timeout,
            || (self.stdout.lock().unwrap().matches(text).count() >= count).then_some(()),
        );
    }

    /// The standard output so far.
    pub(crate) fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// The standard error so far.
    pub(crate) fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the end, up to `deadline`.
    pub(crate) fn finish(mut self, deadline: Duration) -> Ran {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "agent-bus did not finish within {deadline:?}; stderr: {}",
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for reader in self.readers {
            let _ = reader.join();
        }
        let text = |s: &Arc<Mutex<String>>| s.lock().unwrap().clone();
        Ran {
            code: status.code().unwrap_or(-1),
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
        }
    }
}

/// Polls `probe` until it gives a value, failing the test after `timeout`.
pub(crate) fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
