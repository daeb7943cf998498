//! agent-bus dispatcher: takes tasks over REST, keeps their state in PostgreSQL (or an
//! SQLite file), orders them through Redis (or an in-process queue), and launches each as
//! exactly one Kubernetes Job (or a local process), watching it to the end.
//!
//! Only the command-line frame exists so far; the roles arrive with the dispatcher-core
//! issue, and until then every command says so instead of pretending to work.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The agent-bus dispatcher.
#[derive(Debug, Parser)]
#[command(name = "dispatcher", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the api, launcher and watcher roles (not implemented yet).
    Serve,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve => {
            eprintln!("dispatcher: `serve` is not implemented yet (see the dispatcher-core issue)");
            ExitCode::from(2)
        }
    }
}
