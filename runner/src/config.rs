//! The runner's command line: every option with its environment fallback, in one place.
//! Nothing else in the runner reads its own configuration from the environment.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use protocol::env;

use crate::lines;

/// Runner-only environment variables (the dispatcher's are in `protocol::env`).
pub mod runner_env {
    pub const GRACE_SECONDS: &str = "AGENT_BUS_GRACE_SECONDS";
    pub const GPU_SAMPLE_SECONDS: &str = "AGENT_BUS_GPU_SAMPLE_SECONDS";
    pub const TERMINATION_LOG: &str = "AGENT_BUS_TERMINATION_LOG";
    pub const FINAL_FLUSH_SECONDS: &str = "AGENT_BUS_FINAL_FLUSH_SECONDS";
    pub const BUFFER_LIMIT: &str = "AGENT_BUS_BUFFER_LIMIT";
    pub const LOG_BUFFER_BYTES: &str = "AGENT_BUS_LOG_BUFFER_BYTES";
    pub const NVML_LIBRARY: &str = "AGENT_BUS_NVML_LIBRARY";
}

/// The agent-bus runner: runs a task's command, forwards signals to it, enforces its
/// timeout, and reports to the dispatcher. Exits with the command's exit code (128 +
/// signal when a signal ended it; 127/126 when it cannot be started).
#[derive(Debug, Parser)]
#[command(
    name = "runner",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    override_usage = "runner [OPTIONS] -- <COMMAND>...\n       runner report <progress|usage> ...\n       runner install <DIR>"
)]
pub struct Cli {
    #[command(subcommand)]
    pub subcommand: Option<Sub>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Append a progress or usage line to $AGENT_BUS_REPORT_FILE (for use inside the task).
    #[command(subcommand)]
    Report(ReportLine),
    /// Copy this runner into DIR as DIR/runner (what the init container of every task
    /// pod runs, so the runner reaches any image without a shell or `cp`).
    Install {
        /// The folder to put the runner in (an emptyDir shared with the task container).
        dir: PathBuf,
    },
}

/// Options of a run.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The task this run belongs to (only logged; the report URL identifies the attempt).
    #[arg(long, env = env::TASK_ID)]
    pub task_id: Option<String>,
    /// The attempt number of the task (only logged).
    #[arg(long, env = env::ATTEMPT)]
    pub attempt: Option<u32>,
    /// Full URL report batches are POSTed to; without it the command still runs and
    /// reports go nowhere.
    #[arg(long, env = env::REPORT_URL)]
    pub report_url: Option<String>,
    /// Bearer token for the report URL (never passed on to the command).
    #[arg(long, env = env::REPORT_TOKEN, hide_env_values = true)]
    pub report_token: Option<String>,
    /// Seconds until the runner sends SIGTERM to the command; 0 means no timeout.
    #[arg(long, env = env::TIMEOUT_SECONDS, default_value = "0", value_parser = parse_seconds)]
    pub timeout_seconds: Duration,
    /// Seconds between a SIGTERM (forwarded or at the timeout) and the SIGKILL.
    #[arg(long, env = runner_env::GRACE_SECONDS, default_value = "10", value_parser = parse_seconds)]
    pub grace_seconds: Duration,
    /// Seconds between heartbeats; 0 means none.
    #[arg(long, env = env::HEARTBEAT_SECONDS, default_value = "15", value_parser = parse_seconds)]
    pub heartbeat_seconds: Duration,
    /// Seconds between GPU samples; 0 turns GPU monitoring off.
    #[arg(long, env = runner_env::GPU_SAMPLE_SECONDS, default_value = "5", value_parser = parse_seconds)]
    pub gpu_sample_seconds: Duration,
    /// Where the termination summary is written [default: /dev/termination-log, only
    /// if it exists].
    #[arg(long, env = runner_env::TERMINATION_LOG)]
    pub termination_log: Option<PathBuf>,
    /// The line-protocol file the command appends progress and usage lines to [default:
    /// a fresh file in $TMPDIR or /tmp, removed at exit].
    #[arg(long)]
    pub report_file: Option<PathBuf>,
    /// Seconds the runner keeps trying to deliver reports after the command ended.
    #[arg(long, env = runner_env::FINAL_FLUSH_SECONDS, default_value = "10", value_parser = parse_seconds)]
    pub final_flush_seconds: Duration,
    /// Reports kept while the dispatcher is unreachable.
    #[arg(long, env = runner_env::BUFFER_LIMIT, default_value_t = 10_000)]
    pub buffer_limit: usize,
    /// Bytes of output lines kept while the dispatcher does not take them; lines past it
    /// are dropped (a marker line says how many).
    #[arg(long, env = runner_env::LOG_BUFFER_BYTES, default_value_t = crate::logs::DEFAULT_BUFFER_BYTES)]
    pub log_buffer_bytes: usize,
    /// The NVML library loaded at run time.
    #[arg(long, env = runner_env::NVML_LIBRARY, default_value = "libnvidia-ml.so.1")]
    pub nvml_library: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `runner report …`: one line appended to $AGENT_BUS_REPORT_FILE.
#[derive(Debug, Subcommand)]
pub enum ReportLine {
    /// How far the task got: `runner report progress 40 "epoch 2/5"`.
    Progress {
        /// 0 to 100.
        #[arg(allow_negative_numbers = true, value_parser = parse_percent)]
        percent: f64,
        /// An optional message (the remaining words, joined by spaces).
        #[arg(trailing_var_arg = true)]
        message: Vec<String>,
    },
    /// LLM usage: `runner report usage --model gpt-4o --calls 1 --input-tokens 1200
    /// --output-tokens 300 --cost-usd 0.0123`.
    Usage {
        /// The model, as the workload names it (no spaces).
        #[arg(long, value_parser = parse_model)]
        model: String,
        /// Calls made.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_count)]
        calls: u64,
        /// Input (prompt) tokens.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_count)]
        input_tokens: u64,
        /// Output (completion) tokens.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_count)]
        output_tokens: u64,
        /// Dollars, as the workload computed them.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = parse_cost)]
        cost_usd: f64,
    },
}

/// Seconds as a non-negative decimal number (`15`, `0.5`).
fn parse_seconds(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| "must be a number of seconds >= 0".to_owned())
}

fn reason(e: lines::LineError) -> String {
    match e {
        lines::LineError::Invalid { reason, .. } => reason.to_owned(),
        other => other.to_string(),
    }
}

fn parse_percent(value: &str) -> Result<f64, String> {
    lines::validate_percent(value).map_err(reason)
}

fn parse_model(value: &str) -> Result<String, String> {
    lines::validate_model(value).map_err(reason)
}

fn parse_cost(value: &str) -> Result<f64, String> {
    lines::validate_cost(value).map_err(reason)
}

fn parse_count(value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| "must be a whole number >= 0".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_accept_fractions_and_reject_negatives() {
        assert_eq!(parse_seconds("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("inf").is_err());
    }

    #[test]
    fn run_and_report_forms_parse() {
        let cli = Cli::try_parse_from(["runner", "--timeout-seconds", "5", "--", "sh", "-c", "x"])
            .unwrap();
        assert!(cli.subcommand.is_none());
        assert_eq!(cli.run.command, ["sh", "-c", "x"]);
        assert_eq!(cli.run.timeout_seconds, Duration::from_secs(5));

        let cli =
            Cli::try_parse_from(["runner", "report", "progress", "40", "epoch", "2/5"]).unwrap();
        match cli.subcommand {
            Some(Sub::Report(ReportLine::Progress { percent, message })) => {
                assert!((percent - 40.0).abs() < 1e-9);
                assert_eq!(message, ["epoch", "2/5"]);
            }
            other => panic!("{other:?}"),
        }
        let err =
            Cli::try_parse_from(["runner", "report", "usage", "--model", "m", "--calls", "-1"])
                .unwrap_err();
        assert!(err.to_string().contains("--calls"), "{err}");
        assert!(Cli::try_parse_from(["runner"]).is_err());
    }
}
