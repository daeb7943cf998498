//! All configuration: one clap structure, every flag with an environment fallback and a
//! `///` doc that becomes `--help`. Nothing else in the dispatcher reads the environment.
//!
//! Values are parsed into their types here, at the edge: durations (one parser,
//! [`parse_duration`]: whole seconds as `120` or friendly as `2m`, `1h 30m`), quantities
//! ([`crate::task::Memory`]), enums ([`BudgetAction`],
//! [`crate::launcher::job_spec::ImagePullPolicy`]). A default that a library type also has
//! is taken from that type's constant, so it is stated once. The flags of `serve` are in
//! `serve` (the leader election's in `lease`), the value parsers in `values`.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;

use crate::cost::BudgetAction;
use crate::task::submission::MAX_QUEUE_TTL_SECONDS;

mod lease;
mod serve;
mod values;

pub use lease::LeaseArgs;
pub use serve::{CostArgs, PlacementArgs, RunnerArgs, ServeArgs, SubmissionArgs, WebhookArgs};
pub use values::{parse_duration, program_search_path};

/// agent-bus dispatcher: REST task submission, durable state, queue, and one Kubernetes
/// Job (or local process) per task.
#[derive(Debug, Parser)]
#[command(name = "dispatcher", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the dispatcher: the api, launcher and watcher roles (all by default).
    Serve(Box<ServeArgs>),
    /// Applies the database migrations and exits.
    Migrate(DatabaseArgs),
    /// Manages tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Asks a running dispatcher's probe endpoint and exits 0 when it answers 200, 1
    /// otherwise, with one line saying why: a container health check with no shell tools.
    Healthcheck(HealthcheckArgs),
    /// Prints the OpenAPI 3.0.3 document of the API with the default limits (what
    /// `docs/openapi.json` holds: `dispatcher openapi > docs/openapi.json`); a running
    /// dispatcher serves its own limits at `/openapi.json`.
    Openapi,
}

#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The endpoint to ask (`/readyz` for readiness, `/healthz` for liveness).
    #[arg(
        long,
        env = "AGENT_BUS_HEALTHCHECK_URL",
        default_value = "http://127.0.0.1:8080/readyz"
    )]
    pub url: String,
    /// Seconds to wait for the answer before counting the check as failed.
    #[arg(long, env = "AGENT_BUS_HEALTHCHECK_TIMEOUT", value_parser = values::parse_duration, default_value = "5s")]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Lists the tenants: name, creation, whether disabled, queue and budget limits (no
    /// keys: only their hashes are stored).
    List {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Replaces a tenant's API key and prints the new one, alone, on stdout; the old key
    /// is refused (401) from the next request on.
    RotateKey {
        /// The tenant's name.
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Disables a tenant: every request with its key gets 403 and its queued tasks are
    /// held (state queued, reason tenant_quota) until it is enabled; tasks already
    /// launched run to their end.
    Disable {
        /// The tenant's name.
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Enables a disabled tenant again: its key works and its held tasks are launched.
    Enable {
        /// The tenant's name.
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Creates a tenant and prints its new API key, alone, on stdout (only a hash of the
    /// key is stored: keep it, it cannot be shown again).
    Create {
        /// The tenant's name: an RFC 1123 label (lowercase letters, digits, '-').
        name: String,
        /// How many of its tasks may wait in state `queued` at once; more get 429.
        #[arg(long, default_value_t = 1000)]
        max_queued_tasks: u32,
        /// The queue TTL of its tasks that ask for none: seconds a task may wait to be
        /// launched before it expires (1 to 604800); without it, they wait as long as it
        /// takes.
        #[arg(long, value_parser = queue_ttl_seconds())]
        queue_ttl_seconds: Option<u32>,
        #[command(flatten)]
        budget: BudgetArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Sets (or clears) a tenant's budgets.
    Budget {
        /// The tenant's name.
        name: String,
        #[command(flatten)]
        budget: BudgetArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Sets a tenant's default webhook (used by its tasks that name none), or clears it
    /// with --clear; prints the webhook. See docs/WEBHOOKS.md.
    SetWebhook {
        /// The tenant's name.
        name: String,
        /// `http` or `https` URL deliveries are POSTed to.
        #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
        url: Option<String>,
        /// The events sent: terminal (the default), started, retrying.
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        /// Removes the default webhook.
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Prints a tenant's webhook signing secret (`whsec_…`, creating it if it has none);
    /// receivers verify deliveries with it. --rotate replaces it first: deliveries are
    /// signed with the new one from the next attempt on.
    WebhookSecret {
        /// The tenant's name.
        name: String,
        /// Replace the secret with a new one.
        #[arg(long)]
        rotate: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Sets a tenant's default queue TTL, or clears it without SECONDS.
    QueueTtl {
        /// The tenant's name.
        name: String,
        /// Seconds a task that asks for no queue TTL may wait to be launched before it
        /// expires (1 to 604800).
        #[arg(value_parser = queue_ttl_seconds())]
        seconds: Option<u32>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Shows a tenant's quota on running work, or changes it: tasks over it stay queued
    /// (reason `tenant_quota`) and start when its running work ends. Without flags, prints
    /// the quota; with flags, sets the limits given (others are kept) and prints the result.
    Quota {
        /// The tenant's name.
        name: String,
        /// How many of its tasks may be launching, launched or running at once (0 holds
        /// them all).
        // Negative numbers are taken as values so that the refusal names the flag.
        #[arg(long, allow_negative_numbers = true)]
        max_running: Option<u32>,
        /// GPUs of one class its active tasks may hold at once, as CLASS=N (repeat for more
        /// classes, at most 64).
        #[arg(long = "max-gpus", value_name = "CLASS=N", value_parser = values::parse_gpu_quota)]
        max_gpus: Vec<(String, u32)>,
        /// Removes every limit (no other flag with it).
        #[arg(long, conflicts_with_all = ["max_running", "max_gpus"])]
        clear: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// A queue TTL in whole seconds, at most [`MAX_QUEUE_TTL_SECONDS`].
fn queue_ttl_seconds() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(MAX_QUEUE_TTL_SECONDS))
}

/// A tenant's spending limits (see docs/OBSERVABILITY.md, "Cost").
#[derive(Debug, Clone, Args)]
pub struct BudgetArgs {
    /// Dollars per UTC day; without it, no daily budget.
    // Negative numbers are taken as values so that the check names the flag (clap would
    // otherwise call `-5` an unexpected argument).
    #[arg(long, allow_negative_numbers = true)]
    pub daily_budget: Option<f64>,
    /// Dollars per UTC month; without it, no monthly budget.
    #[arg(long, allow_negative_numbers = true)]
    pub monthly_budget: Option<f64>,
    /// What a spent budget does: `alert` (metrics and the alert only) or `refuse` (also
    /// 402 on new submissions until the period ends).
    #[arg(long, value_enum, default_value_t, hide_possible_values = true)]
    pub budget_action: BudgetAction,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Where state lives: `postgres://user@host:port/db` or `sqlite://PATH` (the file is
    /// created if missing). Its value (it may hold a password) is never shown in --help.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://agent-bus.db",
          hide_env_values = true, value_parser = values::secret)]
    pub database_url: SecretString,
    /// Connections in the database pool.
    #[arg(long, env = "AGENT_BUS_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
    /// PostgreSQL: the longest one statement may run before the server cancels it (and
    /// the request gets 503); 0 for no limit. Migrations run without it.
    #[arg(long, env = "AGENT_BUS_DATABASE_STATEMENT_TIMEOUT", value_parser = values::parse_duration, default_value = "30s")]
    pub database_statement_timeout: Duration,
    /// PostgreSQL: the longest a statement waits for a row or table lock; 0 for no limit.
    #[arg(long, env = "AGENT_BUS_DATABASE_LOCK_TIMEOUT", value_parser = values::parse_duration, default_value = "10s")]
    pub database_lock_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorChoice {
    /// Kubernetes when a kubeconfig or in-cluster service account is found, else local.
    Auto,
    /// Every task is a Kubernetes Job.
    Kubernetes,
    /// Every task is a child process of the dispatcher (no image, no cluster).
    Local,
    /// For benchmarks only: every launch succeeds at once and nothing runs (no Job, no
    /// process); tasks stay `launched` forever. Measures the store, queue and launcher
    /// alone (`make bench`).
    Stub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Role {
    /// The REST API.
    Api,
    /// Claims queued tasks and creates their Jobs (or processes).
    Launcher,
    /// Watches Jobs and Pods and records every state change (leader-elected).
    Watcher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log output: human-readable text or one JSON object per line.
    #[arg(long, env = "AGENT_BUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax, e.g. `info,dispatcher=debug`.
    #[arg(long, env = "AGENT_BUS_LOG", default_value = "info", global = true)]
    pub log_filter: String,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Command, TenantCommand};
    use crate::cost::BudgetAction;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_quota_flags_parse_into_limits() {
        let quota = |args: &[&str]| {
            let cli =
                Cli::try_parse_from([&["dispatcher", "tenant", "quota", "acme"], args].concat());
            match cli.map(|cli| cli.command) {
                Ok(Command::Tenant(TenantCommand::Quota {
                    max_running,
                    max_gpus,
                    clear,
                    ..
                })) => Ok((max_running, max_gpus, clear)),
                Ok(other) => panic!("{other:?}"),
                Err(error) => Err(error.to_string()),
            }
        };
        assert_eq!(quota(&[]), Ok((None, vec![], false)));
        assert_eq!(
            quota(&[
                "--max-running",
                "3",
                "--max-gpus",
                "a100=4",
                "--max-gpus",
                "h100=2"
            ]),
            Ok((
                Some(3),
                vec![("a100".to_owned(), 4), ("h100".to_owned(), 2)],
                false
            ))
        );
        assert_eq!(quota(&["--clear"]), Ok((None, vec![], true)));
        for (bad, says) in [
            (&["--max-running", "-1"][..], "--max-running"),
            (&["--max-gpus", "a100"], "CLASS=N"),
            (&["--max-gpus", "A100=4"], "GPU class"),
            (&["--max-gpus", "a100=lots"], "number"),
            (&["--clear", "--max-running", "2"], "--clear"),
        ] {
            let error = quota(bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[test]
    fn the_budget_action_is_an_enum_defaulting_to_alert() {
        let action = |args: &[&str]| {
            let cli =
                Cli::try_parse_from([&["dispatcher", "tenant", "budget", "acme"], args].concat());
            match cli.map(|cli| cli.command) {
                Ok(Command::Tenant(TenantCommand::Budget { budget, .. })) => {
                    Ok(budget.budget_action)
                }
                Ok(other) => panic!("{other:?}"),
                Err(error) => Err(error.to_string()),
            }
        };
        assert_eq!(action(&[]), Ok(BudgetAction::Alert));
        assert_eq!(
            action(&["--budget-action", "refuse"]),
            Ok(BudgetAction::Refuse)
        );
        assert!(
            action(&["--budget-action", "maybe"])
                .unwrap_err()
                .contains("--budget-action")
        );
    }
}
