//! The `runner` binary: parses the command line and either runs the command or appends
//! a report line. Everything lives in the library; this file only wires.

use std::process::ExitCode;

use clap::Parser;
use runner::config::{Cli, ReportLine, Sub};
use runner::{lines, run};

fn main() -> ExitCode {
    // Before anything else: the report token is in this process's environment, and the
    // command runs as the same user. A process that is not dumpable has its
    // /proc/<pid>/environ, mem and the rest owned by root and refuses ptrace, so the
    // command (dumpable again after its execve, which is fine) cannot read the token.
    let hidden = nix::sys::prctl::set_dumpable(false);
    let cli = Cli::parse();
    match cli.subcommand {
        Some(Sub::Report(line)) => report(line),
        Some(Sub::Install { dir }) => install(&dir),
        None => {
            if let Err(e) = hidden {
                eprintln!(
                    "runner: cannot make the runner non-dumpable ({e}): the command may read the report token from /proc"
                );
            }
            ExitCode::from(run::run(&cli.run))
        }
    }
}

/// `runner install DIR`: copies this executable to DIR/runner, executable by everyone,
/// through a temporary file and a rename so a reader never sees half a binary.
fn install(dir: &std::path::Path) -> ExitCode {
    use std::os::unix::fs::PermissionsExt as _;
    let result = (|| -> std::io::Result<std::path::PathBuf> {
        let me = std::env::current_exe()?;
        std::fs::create_dir_all(dir)?;
        let target = dir.join("runner");
        let partial = dir.join(".runner.partial");
        std::fs::copy(&me, &partial)?;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&partial, &target)?;
        Ok(target)
    })();
    match result {
        Ok(target) => {
            eprintln!("runner: installed {}", target.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("runner install: cannot install into {}: {e}", dir.display());
            ExitCode::from(2)
        }
    }
}

/// `runner report …`: appends one line to $AGENT_BUS_REPORT_FILE; exit 2 when it cannot.
fn report(line: ReportLine) -> ExitCode {
    let line = match line {
        ReportLine::Progress { percent, message } => {
            let message = lines::clean_message(&message.join(" "));
            lines::Line::Progress(protocol::Progress {
                percent,
                message: (!message.is_empty()).then_some(message),
            })
        }
        ReportLine::Usage {
            model,
            calls,
            input_tokens,
            output_tokens,
            cost_usd,
        } => lines::Line::Usage(protocol::Usage {
            model,
            calls,
            input_tokens,
            output_tokens,
            cost_usd,
        }),
    };
    let Some(path) = std::env::var_os(protocol::env::REPORT_FILE).filter(|p| !p.is_empty()) else {
        eprintln!(
            "runner report: {} is not set (run this inside `runner -- <command>`)",
            protocol::env::REPORT_FILE
        );
        return ExitCode::from(2);
    };
    match lines::append_line(path.as_ref(), &line) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "runner report: cannot append to {}: {e}",
                std::path::Path::new(&path).display()
            );
            ExitCode::from(2)
        }
    }
}
