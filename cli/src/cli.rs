//! The command line: global flags (server, token, config, context) and one subcommand
//! per action. `--help` of each says what it calls; the top-level `--help` ends with the
//! exit codes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::exit;
use crate::submit::{EnvSecret, Gpu, parse_env_secret, parse_gpu, parse_pair, parse_seconds};

/// The heading the flags every command takes are listed under.
const GLOBAL: &str = "Global options";

/// agent-bus: submit tasks to an agent-bus dispatcher, follow their logs and states, and
/// wait for them to end.
///
/// The dispatcher and the API key come from --server/--token, else AGENT_BUS_URL and
/// AGENT_BUS_TOKEN, else the current context of the config file (`agent-bus config
/// set-context`); the server defaults to http://127.0.0.1:8080.
#[derive(Debug, Parser)]
#[command(name = "agent-bus", version, after_help = exit::HELP, max_term_width = 100)]
pub(crate) struct Cli {
    /// The dispatcher's URL, e.g. https://bus.example.com.
    #[arg(long, global = true, env = "AGENT_BUS_URL", value_name = "URL", help_heading = GLOBAL)]
    pub(crate) server: Option<String>,
    /// The tenant's API key (its value is never shown in --help).
    #[arg(
        long,
        global = true,
        env = "AGENT_BUS_TOKEN",
        hide_env_values = true,
        value_name = "KEY",
        help_heading = GLOBAL
    )]
    pub(crate) token: Option<String>,
    /// The config file [default: $XDG_CONFIG_HOME/agent-bus/config.yaml, else
    /// ~/.config/agent-bus/config.yaml].
    #[arg(long, global = true, env = "AGENT_BUS_CONFIG", value_name = "PATH", help_heading = GLOBAL)]
    pub(crate) config: Option<PathBuf>,
    /// Use this context of the config file instead of its current one.
    #[arg(long, global = true, value_name = "NAME", help_heading = GLOBAL)]
    pub(crate) context: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Submit a task (POST /v1/tasks); prints its id, or with --wait follows it and exits
    /// with its exit code.
    Submit(Box<SubmitArgs>),
    /// Show one task (GET /v1/tasks/{id}).
    Get {
        id: String,
        #[arg(short, long, value_enum)]
        output: Option<Format>,
    },
    /// List tasks, newest first (GET /v1/tasks).
    #[command(alias = "ls")]
    List(ListArgs),
    /// Print a task's output (GET /v1/tasks/{id}/logs).
    Logs(LogsArgs),
    /// Show a task's state changes (GET /v1/tasks/{id}/events); -f follows them.
    Events {
        id: String,
        /// Follow new events until the task ends.
        #[arg(short, long)]
        follow: bool,
        /// JSON (one object per line with -f) or YAML instead of lines.
        #[arg(short, long, value_enum)]
        output: Option<Format>,
    },
    /// Follow a task's output and states until it ends; exits with its exit code.
    Wait {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Cancel a task (POST /v1/tasks/{id}/cancel); a task that already ended is left as
    /// it is.
    Cancel { id: String },
    /// The tenant's spend by queue or day, and its budgets (GET /v1/usage).
    Usage(UsageArgs),
    /// Print a shell completion script: `source <(agent-bus completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Manage the config file's contexts (a server and a token each).
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `-o` of commands that print one API answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Json,
    Yaml,
}

/// `-o` of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ListFormat {
    Json,
    Yaml,
    /// The table with QUEUE, PRIORITY, EXIT and IMAGE too.
    Wide,
}

#[derive(Debug, Args)]
pub(crate) struct WaitArgs {
    /// How long to keep reconnecting when the event stream is lost (the dispatcher
    /// restarting), e.g. 300, 5m.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_seconds)]
    pub(crate) reconnect_for: u32,
    /// Do not show state changes (the task's output only).
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    agent-bus submit --name hello --image busybox:1.36 -- sh -c 'echo hello'\n  \
    agent-bus submit -f task.yaml --gpu a100:2 --env EPOCHS=3 --wait")]
pub(crate) struct SubmitArgs {
    /// A task file, YAML or JSON (the body of POST /v1/tasks); `-` reads standard input.
    /// Flags override its fields.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub(crate) file: Option<PathBuf>,
    /// The task's name, a DNS label [default: the program's name].
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// The container image (the local executor ignores it).
    #[arg(long)]
    pub(crate) image: Option<String>,
    /// CPU request and limit, e.g. 500m or 4.
    #[arg(long)]
    pub(crate) cpu: Option<String>,
    /// Memory request and limit, e.g. 512Mi or 32Gi.
    #[arg(long)]
    pub(crate) memory: Option<String>,
    /// GPUs: a class and a count, e.g. a100:2 (count 1 when left out).
    #[arg(long, value_name = "CLASS[:N]", value_parser = parse_gpu)]
    pub(crate) gpu: Option<Gpu>,
    /// An environment variable, NAME=VALUE (repeatable).
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub(crate) env: Vec<(String, String)>,
    /// A variable set from a key of one of the tenant's secrets, NAME=SECRET:KEY
    /// (repeatable).
    #[arg(long = "env-secret", value_name = "NAME=SECRET:KEY", value_parser = parse_env_secret)]
    pub(crate) env_secret: Vec<EnvSecret>,
    /// How many times a failed attempt may be retried (max_retries).
    #[arg(long)]
    pub(crate) retries: Option<u32>,
    /// The task's time limit, e.g. 3600, 90s, 30m, 2h (timeout_seconds).
    #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
    pub(crate) timeout: Option<u32>,
    /// The queue [default: default].
    #[arg(long)]
    pub(crate) queue: Option<String>,
    /// Higher runs first within its queue.
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) priority: Option<i32>,
    /// A label, KEY=VALUE (repeatable; keys under the prefixes the operator allows).
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub(crate) label: Vec<(String, String)>,
    /// Where to POST the task's webhook events (webhook.url).
    #[arg(long, value_name = "URL")]
    pub(crate) webhook: Option<String>,
    /// Makes the submission safe to retry: the same key and body return the same task.
    #[arg(long, value_name = "KEY")]
    pub(crate) idempotency_key: Option<String>,
    /// Validate only: print the task and the Kubernetes Job it would become.
    #[arg(long, conflicts_with = "wait")]
    pub(crate) dry_run: bool,
    /// Follow the task until it ends and exit with its exit code.
    #[arg(short, long)]
    pub(crate) wait: bool,
    #[command(flatten)]
    pub(crate) wait_args: WaitArgs,
    /// Print the task as JSON or YAML instead of its id.
    #[arg(short, long, value_enum)]
    pub(crate) output: Option<Format>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only tasks in this state (queued, launching, launched, running, succeeded, failed,
    /// cancelled, timed_out, expired).
    #[arg(long)]
    pub(crate) state: Option<String>,
    /// Only tasks of this queue.
    #[arg(long)]
    pub(crate) queue: Option<String>,
    /// Only tasks with this label, KEY=VALUE.
    #[arg(
        short = 'l',
        long = "selector",
        alias = "label",
        value_name = "KEY=VALUE"
    )]
    pub(crate) selector: Option<String>,
    /// Show at most this many tasks (pages of the API are followed).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) limit: u32,
    /// Show every task (follows every page).
    #[arg(short = 'A', long, conflicts_with = "limit")]
    pub(crate) all: bool,
    /// Start after this cursor (printed when more tasks remain).
    #[arg(long)]
    pub(crate) cursor: Option<String>,
    /// Whole tasks (command, environment, volumes…) with -o json|yaml, instead of the
    /// summaries a list shows.
    #[arg(long)]
    pub(crate) full: bool,
    #[arg(short, long, value_enum)]
    pub(crate) output: Option<ListFormat>,
}

#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    pub(crate) id: String,
    /// Keep streaming new lines until the attempt ends.
    #[arg(short, long)]
    pub(crate) follow: bool,
    /// Which attempt [default: the latest].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) attempt: Option<u32>,
    /// Only the last N lines (1 to 10000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) tail: Option<u32>,
    /// Only lines at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub(crate) since: Option<String>,
    /// Prefix each line with its time and stream.
    #[arg(long)]
    pub(crate) timestamps: bool,
}

#[derive(Debug, Args)]
pub(crate) struct UsageArgs {
    /// Start, inclusive: a date (2026-11-01) or RFC 3339 time [default: this month's start].
    #[arg(long)]
    pub(crate) from: Option<String>,
    /// End, exclusive [default: now].
    #[arg(long)]
    pub(crate) to: Option<String>,
    /// Group by queue or day.
    #[arg(long, value_enum, default_value_t = GroupBy::Queue)]
    pub(crate) group_by: GroupBy,
    #[arg(short, long, value_enum)]
    pub(crate) output: Option<Format>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum GroupBy {
    Queue,
    Day,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Add or change a context with the global --server and --token given here (only
    /// what is given changes; AGENT_BUS_URL/AGENT_BUS_TOKEN are not saved). The first
    /// context becomes the current one.
    SetContext { name: String },
    /// Make a context the current one.
    UseContext { name: String },
    /// List the contexts (tokens are not shown).
    GetContexts,
    /// Print the current context's name.
    CurrentContext,
    /// Remove a context.
    DeleteContext { name: String },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_takes_repeatable_flags_and_the_command_after_dashes() {
        let cli = Cli::try_parse_from([
            "agent-bus",
            "submit",
            "--gpu",
            "a100:2",
            "--env",
            "A=1",
            "-e",
            "B=x=y",
            "--env-secret",
            "K=s:k",
            "--timeout",
            "5m",
            "--priority",
            "-3",
            "-l",
            "a.io/b=c",
            "--",
            "python",
            "-c",
            "print(1)",
        ])
        .unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(
            args.gpu,
            Some(Gpu {
                class: "a100".into(),
                count: 2
            })
        );
        assert_eq!(
            args.env,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(args.env_secret[0].secret, "s");
        assert_eq!(args.timeout, Some(300));
        assert_eq!(args.priority, Some(-3));
        assert_eq!(args.command, ["python", "-c", "print(1)"]);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for argv in [
            &["agent-bus", "submit", "--gpu", "a100:x"][..],
            &["agent-bus", "submit", "--env", "NOEQUALS"],
            &["agent-bus", "submit", "--timeout", "soon"],
            &["agent-bus", "list", "-o", "table"],
            &["agent-bus", "logs", "id", "--tail", "0"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from([
            "agent-bus",
            "list",
            "--server",
            "http://x:1",
            "--token",
            "k",
        ])
        .unwrap();
        assert_eq!(cli.server.as_deref(), Some("http://x:1"));
        assert_eq!(cli.token.as_deref(), Some("k"));
    }
}
