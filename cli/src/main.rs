//! `agent-bus`: the command-line client of the dispatcher's REST API (and nothing else:
//! it does not link the dispatcher). `main` parses, runs one command, and turns any
//! error into one `agent-bus: error: ...` line and a documented exit code
//! ([`exit`]); a panic, should one happen, is one line too.

mod cli;
mod client;
mod commands;
mod config;
mod error;
mod exit;
mod sse;
mod submit;
mod view;
mod wait;
mod yaml;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, parser::ValueSource};

use crate::error::write_err;

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        write_err(&format!("agent-bus: error: internal error: {info}\n"));
    }));
    let matches = match cli::Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(error) => return usage_error(&error),
    };
    let cli = match cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    // Global flags are seen by the innermost subcommand's matches.
    let mut innermost = &matches;
    while let Some((_, sub)) = innermost.subcommand() {
        innermost = sub;
    }
    let typed = commands::Typed {
        server: innermost.value_source("server") == Some(ValueSource::CommandLine),
        token: innermost.value_source("token") == Some(ValueSource::CommandLine),
    };
    match commands::run(cli, typed) {
        Ok(code) => ExitCode::from(code),
        Err(error::Error::BrokenPipe) => ExitCode::from(exit::BROKEN_PIPE),
        Err(error) => {
            write_err(&format!("agent-bus: error: {error}\n"));
            ExitCode::from(error.exit_code())
        }
    }
}

/// Help and version go to standard output with 0; a usage mistake is one line (clap's
/// first, without its usage block) and [`exit::USAGE`].
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::from(exit::OK)
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            write_err(&error.render().to_string());
            ExitCode::from(exit::USAGE)
        }
        _ => {
            // clap's first paragraph (the message and, e.g., the missing arguments), as
            // one line; its usage block and tips are left out.
            let rendered = error.render().to_string();
            let paragraph: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .skip_while(|line| line.is_empty())
                .take_while(|line| !line.is_empty())
                .collect();
            let joined = paragraph.join(" ");
            let first = joined.strip_prefix("error: ").unwrap_or(&joined);
            write_err(&format!(
                "agent-bus: error: {first} (see agent-bus --help)\n"
            ));
            ExitCode::from(exit::USAGE)
        }
    }
}
