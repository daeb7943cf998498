//! agent-bus runner: the entrypoint wrapper around a task's command inside its pod
//! (`runner [options] -- <command>`). It passes the command's output through, forwards
//! signals, enforces the timeout, reports to the dispatcher (started, heartbeats with GPU
//! samples, progress, usage, finished) and writes a termination summary; `runner report`
//! is the workload's side of the line protocol.
//!
//! Modules: [`run`] (one run, start to finish), [`child`] (process, signals, waiting),
//! [`output`] (pass-through, CUDA OOM scan, stderr tail), [`logs`] (shipping output
//! lines to the dispatcher), [`lines`] (the line protocol),
//! [`sender`] (buffered delivery), [`gpu`] (NVML), [`classify`] (failure classes),
//! [`config`] (the command line).

/// The runner's own log lines: few, on stderr, prefixed `runner:`.
macro_rules! log {
    ($($arg:tt)*) => {
        {
            // One write per line: the runner's stderr also carries the command's, and a line
            // written in pieces could be spliced with the command's output.
            let line = format!("runner: {}\n", format_args!($($arg)*));
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        }
    };
}
pub(crate) use log;

pub mod child;
pub mod classify;
pub mod config;
pub mod gpu;
pub mod lines;
pub mod logs;
pub mod output;
pub mod run;
pub mod sender;
