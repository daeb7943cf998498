//! The local executor: runs a task's command as a child process of the dispatcher, for
//! the embedded single-machine mode (no image, no cluster), through the same runner that
//! wraps commands in pods: `runner -- <command> <args>`. The runner enforces the timeout,
//! reports to this dispatcher's `/internal/v1` endpoint and leaves its summary in a
//! termination-log file; the executor records the outcome (with the runner's failure
//! class) and the last lines of output, and stops the process on cancel.
//!
//! Invariants: the child gets a clean environment (the task's variables, PATH, HOME and
//! the runner's AGENT_BUS_* variables, never the dispatcher's own secrets); the values
//! of the task's secret references are read from the local secret store at launch and
//! go into that environment only (a secret gone since the submit fails the launch,
//! `launch_rejected`, naming it); as root, it runs as its tenant's own user in a folder
//! only that user can enter (see [`super::isolation`]), and without root it serves one
//! tenant unless told otherwise; the termination log the task could have replaced is
//! read without following links and bounded; one process
//! per task attempt; the recorded outcome is a compare-and-set from `running`, so a
//! cancel that won the race is never overwritten; a runner that does not stop within its
//! own timeout and grace is killed; the runner's own `started` report may move the task
//! to `running` before the executor does, which is the same outcome, not a cancel.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::Command;
use tokio::sync::oneshot;

use protocol::{TerminationSummary, env as runner_env};

use super::LaunchOutcome;
use super::isolation::{self, TaskUser, TaskUsers};
use super::job_spec::DEADLINE_MARGIN_SECONDS;
use crate::lifecycle::Lifecycle;
use crate::report::{ReportIssuer, outcome_of};
use crate::secrets::LocalSecrets;
use crate::task::lifecycle::{Ending, Move};
use crate::task::retry::FailureClass;
use crate::task::{EnvValue, Reason, Task, TaskId, TaskState};

/// How much of the output's end is kept for the task's message.
const OUTPUT_TAIL_BYTES: usize = 2048;
/// After a cancel, how long the runner has to stop its command before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct LocalExecutor {
    lifecycle: Lifecycle,
    workdir: PathBuf,
    runner: Option<LocalRunner>,
    /// Where the values of the tasks' secret references are read at launch.
    secrets: Option<LocalSecrets>,
    running: Arc<Mutex<HashMap<TaskId, oneshot::Sender<()>>>>,
    users: TaskUsers,
    /// Each tenant's task user, once read from the store (it never changes).
    known_users: Arc<Mutex<HashMap<String, TaskUser>>>,
}

/// The runner binary and where it reports.
#[derive(Debug, Clone)]
struct LocalRunner {
    path: PathBuf,
    reports: Option<ReportIssuer>,
}

impl std::fmt::Debug for LocalExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalExecutor")
            .field("workdir", &self.workdir)
            .finish_non_exhaustive()
    }
}

impl LocalExecutor {
    #[must_use]
    pub fn new(lifecycle: Lifecycle, workdir: PathBuf) -> Self {
        // Absolute, so a task's HOME (its attempt's folder) means the same after a `cd`.
        let workdir = std::path::absolute(&workdir).unwrap_or(workdir);
        Self {
            lifecycle,
            workdir,
            runner: None,
            secrets: None,
            running: Arc::default(),
            users: TaskUsers::Shared { more_tenants: true },
            known_users: Arc::default(),
        }
    }

    /// Runs tasks as `users` in `workdir` as [`isolation::prepare_root`] left it.
    #[must_use]
    pub fn with_users(mut self, users: TaskUsers) -> Self {
        self.users = users;
        self
    }

    /// The user a task of `task`'s tenant runs as (`None`: the dispatcher's own), or
    /// why it may not run.
    async fn task_user(&self, task: &Task) -> Result<Option<TaskUser>, LaunchOutcome> {
        match self.users {
            TaskUsers::Shared { more_tenants: true } => Ok(None),
            TaskUsers::Shared {
                more_tenants: false,
            } => {
                // Tenants can be created while the dispatcher runs: count at each launch.
                let tenants = self
                    .lifecycle
                    .store()
                    .tenant_count()
                    .await
                    .map_err(|e| LaunchOutcome::Transient(e.to_string()))?;
                match isolation::too_many_tenants(tenants) {
                    Some(refusal) => Err(LaunchOutcome::Rejected(refusal)),
                    None => Ok(None),
                }
            }
            TaskUsers::PerTenant { uid_base } => {
                let known = self
                    .known_users
                    .lock()
                    .ok()
                    .and_then(|users| users.get(&task.tenant).copied());
                if let Some(user) = known {
                    return Ok(Some(user));
                }
                let slot = self
                    .lifecycle
                    .store()
                    .local_task_slot(&task.tenant)
                    .await
                    .map_err(|e| LaunchOutcome::Transient(e.to_string()))?;
                let user = TaskUser::of_slot(uid_base, slot).ok_or_else(|| {
                    LaunchOutcome::Rejected(format!(
                        "no user id is left for tenant '{}' (slot {slot} above --local-task-uid-base {uid_base})",
                        task.tenant
                    ))
                })?;
                if let Ok(mut users) = self.known_users.lock() {
                    users.insert(task.tenant.clone(), user);
                }
                Ok(Some(user))
            }
        }
    }

    /// Runs tasks through the runner at `path`, reporting through `reports`. Without it
    /// (unit tests of the executor alone) commands run bare.
    #[must_use]
    pub fn with_runner(mut self, path: PathBuf, reports: Option<ReportIssuer>) -> Self {
        self.runner = Some(LocalRunner { path, reports });
        self
    }

    /// Reads the values of tasks' secret references from `secrets`. Without it, a task
    /// that references a secret fails its launch.
    #[must_use]
    pub fn with_secrets(mut self, secrets: LocalSecrets) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// The values of `task`'s secret references by variable, or why the launch fails:
    /// `Err(Rejected)` when a secret or key is gone since the submit (naming the
    /// variable and the secret; retrying cannot help), `Err(Transient)` when the store
    /// could not be read.
    async fn secret_values(
        &self,
        task: &Task,
    ) -> Result<Vec<(String, SecretString)>, LaunchOutcome> {
        if task.spec.env.values().all(|value| value.secret().is_none()) {
            return Ok(Vec::new());
        }
        let Some(secrets) = &self.secrets else {
            return Err(LaunchOutcome::Rejected(
                "the task references secrets and this executor has no secret store".to_owned(),
            ));
        };
        match secrets.resolve(&task.tenant, &task.spec.env).await {
            Ok(Ok(values)) => Ok(values),
            Ok(Err(unresolved)) => {
                tracing::info!(variable = %unresolved.variable, secret = %unresolved.secret, "a referenced secret is gone; the launch fails");
                Err(LaunchOutcome::Rejected(format!(
                    "{}: {unresolved}",
                    unresolved.field()
                )))
            }
            Err(error) => Err(LaunchOutcome::Transient(error.to_string())),
        }
    }

    /// Starts the process of a claimed (`launching`) task and records it `running`.
    #[tracing::instrument(skip_all, fields(task_id = %task.id, attempt = task.attempt))]
    pub async fn launch(&self, task: &Task) -> LaunchOutcome {
        let mut argv = task.spec.command.iter().chain(task.spec.args.iter());
        let Some(program) = argv.next() else {
            return LaunchOutcome::Rejected(
                "the local executor needs a command (it runs no image entrypoint)".to_owned(),
            );
        };
        let secret_values = match self.secret_values(task).await {
            Ok(values) => values,
            Err(outcome) => return outcome,
        };
        let user = match self.task_user(task).await {
            Ok(user) => user,
            Err(refused) => return refused,
        };
        let (root, tenant) = (self.workdir.clone(), task.tenant.clone());
        let name = format!("{}-{}", task.id, task.attempt);
        let prepared = tokio::task::spawn_blocking(move || {
            isolation::attempt_folder(&root, &tenant, &name, user)
        })
        .await;
        let dir = match prepared {
            Ok(Ok(dir)) => dir,
            Ok(Err(error @ isolation::IsolationError::TenantName(_))) => {
                return LaunchOutcome::Rejected(error.to_string());
            }
            Ok(Err(error)) => return LaunchOutcome::Transient(error.to_string()),
            Err(error) => return LaunchOutcome::Transient(error.to_string()),
        };
        // Absolute: the runner runs in the task's folder, not the dispatcher's.
        let termination_log = std::path::absolute(dir.join("termination-log"))
            .unwrap_or_else(|_| dir.join("termination-log"));
        let _ = tokio::fs::remove_file(&termination_log).await;
        let mut command = if let Some(runner) = &self.runner {
            {
                let mut command = Command::new(&runner.path);
                command
                    .env_clear()
                    .arg("--termination-log")
                    .arg(&termination_log)
                    .arg("--")
                    .arg(program)
                    .args(argv)
                    .env(runner_env::TASK_ID, task.id.to_string())
                    .env(runner_env::ATTEMPT, task.attempt.to_string())
                    .env(
                        runner_env::TIMEOUT_SECONDS,
                        task.spec.timeout_seconds.to_string(),
                    );
                if let Some(reports) = &runner.reports {
                    let access = reports.access(task, jiff::Timestamp::now());
                    command
                        .env(runner_env::REPORT_URL, access.url)
                        .env(runner_env::REPORT_TOKEN, access.token);
                }
                command
            }
        } else {
            let mut command = Command::new(program);
            command.env_clear().args(argv);
            command
        };
        command
            .current_dir(&dir)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &dir)
            .envs(
                task.spec
                    .env
                    .iter()
                    .filter_map(|(name, value)| match value {
                        EnvValue::Plain(value) => Some((name, value)),
                        EnvValue::Secret(_) => None,
                    }),
            )
            // The values go into the child's environment and nowhere else.
            .envs(
                secret_values
                    .iter()
                    .map(|(name, value)| (name, value.expose_secret())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(user) = user {
            // As root, the standard library also drops the supplementary groups.
            command.uid(user.uid).gid(user.gid);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                return LaunchOutcome::Rejected(format!("starting '{program}': {error}"));
            }
        };
        match self
            .lifecycle
            .apply(task.id, TaskState::Launching, Move::Started)
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => {
                // Either the runner's `started` report moved the task to `running` first
                // (it can be that quick), or the task was cancelled while we started it.
                let current = self.lifecycle.store().task(task.id).await;
                let ours = matches!(&current, Ok(Some(now))
                    if now.state == TaskState::Running && now.attempt == task.attempt);
                if !ours {
                    let _ = child.kill().await;
                    return LaunchOutcome::AlreadyHandled;
                }
            }
            Err(error) => {
                let _ = child.kill().await;
                return LaunchOutcome::Transient(error.to_string());
            }
        }
        let (stop_sender, stop) = oneshot::channel();
        if let Ok(mut running) = self.running.lock() {
            running.insert(task.id, stop_sender);
        }
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(OUTPUT_TAIL_BYTES)));
        let readers = [
            child
                .stdout
                .take()
                .map(|out| tokio::spawn(keep_tail(out, tail.clone()))),
            child
                .stderr
                .take()
                .map(|err| tokio::spawn(keep_tail(err, tail.clone()))),
        ];
        let executor = self.clone();
        let id = task.id;
        let attempt = task.attempt;
        let timeout = Duration::from_secs(u64::from(task.spec.timeout_seconds));
        let backstop = match &self.runner {
            Some(_) => timeout + Duration::from_secs(u64::from(DEADLINE_MARGIN_SECONDS)),
            None => timeout,
        };
        tokio::spawn(async move {
            let outcome = tokio::select! {
                status = child.wait() => Some(status),
                () = tokio::time::sleep(backstop) => None,
                _ = stop => {
                    // The runner forwards SIGTERM to the command and stops it after its
                    // grace period; kill it only if it does not.
                    terminate(&child);
                    if tokio::time::timeout(CANCEL_GRACE, child.wait()).await.is_err() {
                        let _ = child.kill().await;
                    }
                    if let Ok(mut running) = executor.running.lock() {
                        running.remove(&id);
                    }
                    return;
                }
            };
            if outcome.is_none() {
                let _ = child.kill().await;
            }
            for reader in readers.into_iter().flatten() {
                let _ = reader.await;
            }
            let output = tail
                .lock()
                .map(|t| {
                    without_runner_lines(&String::from_utf8_lossy(
                        &t.iter().copied().collect::<Vec<u8>>(),
                    ))
                })
                .unwrap_or_default();
            let summary = read_termination_log(&termination_log)
                .await
                .and_then(|text| TerminationSummary::from_message(&text));
            if let Some(summary) = &summary
                && let Err(error) = executor
                    .lifecycle
                    .record_termination(id, attempt, summary)
                    .await
            {
                tracing::warn!(task_id = %id, error = %error, "keeping the runner's summary failed");
            }
            let classified = summary
                .as_ref()
                .and_then(|s| s.outcome.failure_class)
                .map(outcome_of);
            let change = match outcome {
                None => Ending::new(TaskState::TimedOut)
                    .reason(Reason::DeadlineExceeded)
                    .message(format!(
                        "killed after the timeout of {}s",
                        timeout.as_secs()
                    )),
                Some(Ok(status)) if status.success() => Ending {
                    message: (!output.is_empty()).then_some(output),
                    ..Ending::new(TaskState::Succeeded).exit_code(0)
                },
                Some(Ok(status)) => {
                    let (to, reason) = classified.unwrap_or((TaskState::Failed, Reason::ExitCode));
                    let ending = Ending::new(to)
                        .reason(reason)
                        .message(output)
                        .exit_code(exit_code_of(status));
                    match summary.as_ref().and_then(|s| s.outcome.failure_class) {
                        Some(class) => ending.class(FailureClass::from_runner(class)),
                        None => ending,
                    }
                }
                Some(Err(error)) => Ending::new(TaskState::Failed)
                    .reason(Reason::JobLost)
                    .message(format!("waiting for the process failed: {error}")),
            };
            if let Ok(mut running) = executor.running.lock() {
                running.remove(&id);
            }
            match executor
                .lifecycle
                .apply(id, TaskState::Running, Move::Ended(change))
                .await
            {
                Ok(Some(task)) => {
                    tracing::info!(task_id = %id, state = %task.state, exit_code = ?task.exit_code, "task finished");
                }
                Ok(None) => {
                    tracing::info!(task_id = %id, "task finished after it was already ended (cancelled)");
                }
                Err(error) => {
                    tracing::error!(task_id = %id, error = %error, "recording the outcome failed");
                }
            }
        });
        LaunchOutcome::AlreadyHandled
    }

    /// Stops the process of `task`, if this dispatcher runs it.
    pub fn stop(&self, id: TaskId) {
        let sender = self
            .running
            .lock()
            .ok()
            .and_then(|mut running| running.remove(&id));
        if let Some(sender) = sender {
            let _ = sender.send(());
        }
    }
}

/// The runner's summary as the task's user left it: the task could have put a link, a
/// FIFO or a huge file there, so it is opened without following links or waiting, and
/// only a regular file's first bytes (as many as a termination message may have) are read.
async fn read_termination_log(path: &std::path::Path) -> Option<String> {
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
        .await
        .ok()?;
    if !file.metadata().await.ok()?.is_file() {
        return None;
    }
    let mut text = Vec::new();
    file.take(protocol::TERMINATION_MESSAGE_LIMIT as u64)
        .read_to_end(&mut text)
        .await
        .ok()?;
    String::from_utf8(text).ok()
}

/// The command's output without the runner's own `runner:` log lines (which pods keep in
/// their container log, but which say nothing about the task's outcome).
fn without_runner_lines(output: &str) -> String {
    output
        .split_inclusive('\n')
        .filter(|line| !line.starts_with("runner: "))
        .collect()
}

/// Asks the process to stop (SIGTERM), which the runner forwards to the command.
fn terminate(child: &tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// 128 + signal for a process killed by a signal, as shells report it.
fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(signal) = status.signal() {
            return 128 + signal;
        }
    }
    status.code().unwrap_or(-1)
}

/// Appends a stream's output to the shared tail a whole line at a time, so that stdout and
/// stderr read concurrently never splice into each other's lines (a line cut in two would
/// also escape `without_runner_lines`). A last line without a newline is kept at the end.
async fn keep_tail(mut stream: impl AsyncRead + Unpin, tail: Arc<Mutex<VecDeque<u8>>>) {
    let mut buffer = [0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    let append = |bytes: &[u8]| {
        if let Ok(mut tail) = tail.lock() {
            tail.extend(bytes);
            let excess = tail.len().saturating_sub(OUTPUT_TAIL_BYTES);
            tail.drain(..excess);
        }
    };
    while let Ok(read) = stream.read(&mut buffer).await {
        if read == 0 {
            break;
        }
        pending.extend_from_slice(&buffer[..read]);
        if let Some(last_newline) = pending.iter().rposition(|&b| b == b'\n') {
            append(&pending[..=last_newline]);
            pending.drain(..=last_newline);
        }
        if pending.len() > OUTPUT_TAIL_BYTES {
            // One endless line: only its end can be in the tail anyway.
            append(&pending);
            pending.clear();
        }
    }
    if !pending.is_empty() {
        append(&pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn concurrent_streams_never_splice_into_each_others_lines() {
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (mut stderr_in, stderr_out) = tokio::io::duplex(64);
        let (mut stdout_in, stdout_out) = tokio::io::duplex(64);
        let readers = [
            tokio::spawn(keep_tail(stderr_out, tail.clone())),
            tokio::spawn(keep_tail(stdout_out, tail.clone())),
        ];
        // The runner's line arrives in two pieces with the command's line in between.
        stderr_in.write_all(b"runner: no GPU stats: ").await.ok();
        stderr_in.flush().await.ok();
        tokio::task::yield_now().await;
        stdout_in.write_all(b"hello world\n").await.ok();
        drop(stdout_in);
        tokio::task::yield_now().await;
        stderr_in
            .write_all(b"NVML not available\nlast words")
            .await
            .ok();
        drop(stderr_in);
        for reader in readers {
            let _ = reader.await;
        }
        let merged = tail
            .lock()
            .map(|t| String::from_utf8_lossy(&t.iter().copied().collect::<Vec<u8>>()).into_owned())
            .unwrap_or_default();
        assert_eq!(without_runner_lines(&merged), "hello world\nlast words");
    }

    #[test]
    fn runner_lines_are_dropped_and_the_rest_kept_byte_for_byte() {
        assert_eq!(
            without_runner_lines("runner: started\nout\n  runner: not ours\nend"),
            "out\n  runner: not ours\nend"
        );
    }
}
