//! The `dispatcher` binary: parses the configuration and runs the command. Everything it
//! starts is wired in the library's `dispatcher::app`.

use std::process::ExitCode;

use clap::Parser as _;
use dispatcher::app;
use dispatcher::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    app::init_logging(&cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dispatcher: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Healthcheck(args) = &cli.command {
        return runtime.block_on(app::healthcheck::run(args));
    }
    match runtime.block_on(app::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "dispatcher failed");
            eprintln!("dispatcher: {error:#}");
            ExitCode::FAILURE
        }
    }
}
