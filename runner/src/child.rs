//! The command's process: spawning it in its own process group with piped output,
//! signalling the group, and waiting for it (as PID 1, reaping every orphan too, the way
//! tini does, without losing the command's own status).

use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// The running command.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub stdout: ChildStdout,
    pub stderr: ChildStderr,
}

/// The command could not be started; `exit_code` is the shell's convention.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot run {program:?}: {reason}")]
pub struct SpawnError {
    pub program: String,
    pub reason: String,
    /// 127 when not found, 126 when found but not executable.
    pub exit_code: i32,
}

/// What the child's environment differs in from the runner's.
#[derive(Debug, Default)]
pub struct EnvChanges {
    pub remove: Vec<&'static str>,
    pub set: Vec<(&'static str, OsString)>,
}

/// Spawns `command` (program and arguments) in a new process group, stdin inherited,
/// stdout and stderr piped.
pub fn spawn(command: &[String], env: &EnvChanges) -> Result<Spawned, SpawnError> {
    let Some((program, args)) = command.split_first() else {
        return Err(SpawnError {
            program: String::new(),
            reason: "no command given".into(),
            exit_code: 127,
        });
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for name in &env.remove {
        cmd.env_remove(name);
    }
    for (name, value) in &env.set {
        cmd.env(name, value);
    }
    let mut child = cmd.spawn().map_err(|e| SpawnError {
        program: program.clone(),
        exit_code: if e.kind() == ErrorKind::NotFound {
            127
        } else {
            126
        },
        reason: e.to_string(),
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    match (child.stdout.take(), child.stderr.take()) {
        (Some(stdout), Some(stderr)) => Ok(Spawned {
            pid,
            stdout,
            stderr,
        }),
        // Piped streams are always there after a successful spawn.
        _ => Err(SpawnError {
            program: program.clone(),
            reason: "no output pipes".into(),
            exit_code: 126,
        }),
    }
}

/// Sends `signal` to the command's process group, or to the command alone when the
/// group is gone (it moved itself to another one).
pub fn signal_group(pid: Pid, signal: Signal) {
    if killpg(pid, signal).is_err() {
        let _ = kill(pid, signal);
    }
}

/// How the command ended, with the resource usage of the runner's waited-for children.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub at: Instant,
    pub max_rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

/// Starts the thread that waits for `pid` and calls `exited` once it ended. As PID 1
/// (`reap_all`) it waits for any child, so orphans re-parented to us are reaped too, and
/// it keeps reaping after the command ended.
pub fn spawn_waiter(
    pid: Pid,
    reap_all: bool,
    exited: impl FnOnce(Exit) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("wait".into())
        .spawn(move || wait_loop(pid, reap_all, exited))
        .map(drop)
}

/// Waits for `pid` on this thread (when no wait thread can be started).
#[must_use]
pub fn wait_now(pid: Pid) -> Exit {
    let mut result = None;
    wait_loop(pid, false, |exit| result = Some(exit));
    result.unwrap_or(Exit {
        exit_code: None,
        signal: None,
        at: Instant::now(),
        max_rss_bytes: None,
        cpu_seconds: None,
    })
}

fn wait_loop(pid: Pid, reap_all: bool, exited: impl FnOnce(Exit)) {
    let mut exited = Some(exited);
    let target = if reap_all { Pid::from_raw(-1) } else { pid };
    loop {
        let ended = match waitpid(target, None) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => Some((Some(code), None)),
            Ok(WaitStatus::Signaled(p, signal, _)) if p == pid => Some((None, Some(signal as i32))),
            Ok(_) | Err(Errno::EINTR) => None,
            Err(Errno::ECHILD) if exited.is_none() => {
                // Nothing left to reap right now; orphans may still come.
                std::thread::sleep(Duration::from_millis(200));
                None
            }
            Err(e) => {
                if let Some(exited) = exited.take() {
                    crate::log!("lost track of the command: waitpid failed: {e}");
                    exited(Exit {
                        exit_code: None,
                        signal: None,
                        at: Instant::now(),
                        max_rss_bytes: None,
                        cpu_seconds: None,
                    });
                }
                return;
            }
        };
        if let Some((exit_code, signal)) = ended {
            let at = Instant::now();
            let usage = getrusage(UsageWho::RUSAGE_CHILDREN).ok();
            if let Some(exited) = exited.take() {
                exited(Exit {
                    exit_code,
                    signal,
                    at,
                    max_rss_bytes: usage.map(|u| u.max_rss().max(0) as u64 * 1024),
                    cpu_seconds: usage.map(|u| {
                        let t = u.user_time() + u.system_time();
                        t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6
                    }),
                });
            }
            if !reap_all {
                return;
            }
        }
    }
}

/// Signals the runner passes on to the command's group.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Starts the thread that turns the runner's [`FORWARDED`] signals into calls of
/// `received`. The handlers are installed before this returns, so no signal is lost
/// between now and the command's start.
pub fn catch_signals(
    received: impl Fn(Signal) + Send + 'static,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut signals = signal_hook::iterator::Signals::new(FORWARDED.map(|s| s as i32))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for number in signals.forever() {
                if let Ok(signal) = Signal::try_from(number) {
                    received(signal);
                }
            }
        })?;
    Ok(())
}

/// Sends `sender` an event once `f` has something, for use as a callback.
pub fn to_channel<T, E: Send + 'static>(
    sender: mpsc::Sender<E>,
    wrap: impl Fn(T) -> E + Send + 'static,
) -> impl Fn(T) + Send + 'static {
    move |value| {
        let _ = sender.send(wrap(value));
    }
}
