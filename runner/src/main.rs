//! agent-bus runner: the entrypoint wrapper around a task's command inside its pod
//! (`runner -- <command>`). It forwards signals, enforces the timeout and reports to the
//! dispatcher.
//!
//! Only the command-line frame exists so far; the runner arrives with its own issue, and
//! until then it refuses to run anything instead of pretending to.

use std::process::ExitCode;

use clap::Parser;

/// The agent-bus runner.
#[derive(Debug, Parser)]
#[command(name = "runner", version, about)]
struct Cli {
    /// The command to run, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "runner: running {:?} is not implemented yet (see the runner issue)",
        cli.command
    );
    ExitCode::from(2)
}
