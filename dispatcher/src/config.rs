//! All configuration: one clap structure, every flag with an environment fallback and a
//! `///` doc that becomes `--help`. Nothing else in the dispatcher reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    #[arg(long, env = "AGENT_BUS_HEALTHCHECK_TIMEOUT", value_parser = parse_seconds, default_value = "5")]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Creates a tenant and prints its new API key, alone, on stdout (only a hash of the
    /// key is stored: keep it, it cannot be shown again).
    Create {
        /// The tenant's name: an RFC 1123 label (lowercase letters, digits, '-').
        name: String,
        /// How many of its tasks may wait in state `queued` at once; more get 429.
        #[arg(long, default_value_t = 1000)]
        max_queued_tasks: u32,
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
    #[arg(long, default_value = "alert")]
    pub budget_action: String,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Where state lives: `postgres://user@host:port/db` or `sqlite://PATH` (the file is
    /// created if missing).
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://agent-bus.db")]
    pub database_url: String,
    /// Connections in the database pool.
    #[arg(long, env = "AGENT_BUS_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorChoice {
    /// Kubernetes when a kubeconfig or in-cluster service account is found, else local.
    Auto,
    /// Every task is a Kubernetes Job.
    Kubernetes,
    /// Every task is a child process of the dispatcher (no image, no cluster).
    Local,
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

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the HTTP API listens on.
    #[arg(long, env = "AGENT_BUS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Redis for the queue (`redis://host:port`); without it, an in-process queue is used
    /// (single dispatcher process only).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key the dispatcher writes.
    #[arg(long, env = "AGENT_BUS_REDIS_PREFIX", default_value = "agent-bus:")]
    pub redis_prefix: String,
    /// Where tasks run.
    #[arg(long, env = "AGENT_BUS_EXECUTOR", value_enum, default_value_t = ExecutorChoice::Auto)]
    pub executor: ExecutorChoice,
    /// Kubeconfig for the Kubernetes executor; without it, the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Path of the in-cluster service-account token, whose presence makes `auto` choose
    /// Kubernetes.
    #[arg(
        long,
        env = "AGENT_BUS_IN_CLUSTER_TOKEN",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token",
        hide = true
    )]
    pub in_cluster_token: PathBuf,
    /// Namespace the task Jobs are created in.
    #[arg(long, env = "AGENT_BUS_NAMESPACE", default_value = "agent-bus-tasks")]
    pub namespace: String,
    /// Roles this process runs, comma-separated.
    #[arg(long, env = "AGENT_BUS_ROLES", value_enum, value_delimiter = ',', default_values_t = [Role::Api, Role::Launcher, Role::Watcher])]
    pub roles: Vec<Role>,
    /// Largest accepted request body, in bytes; larger ones get 413.
    #[arg(long, env = "AGENT_BUS_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Job creations in flight at once, per launcher.
    #[arg(long, env = "AGENT_BUS_LAUNCH_CONCURRENCY", default_value_t = 32)]
    pub launch_concurrency: usize,
    /// A pod unschedulable this long gives its task the visible reason `unschedulable`.
    #[arg(long, env = "AGENT_BUS_UNSCHEDULABLE_AFTER", value_parser = parse_seconds, default_value = "120")]
    pub unschedulable_after: Duration,
    /// How often reconcilers compare the store with the queue and the cluster.
    #[arg(long, env = "AGENT_BUS_RECONCILE_INTERVAL", value_parser = parse_seconds, default_value = "5")]
    pub reconcile_interval: Duration,
    /// A task still `launching` after this long is launched again (idempotently: its Job
    /// name is fixed, so a Job created before a crash is found, not duplicated).
    #[arg(long, env = "AGENT_BUS_LAUNCHING_STALE_AFTER", value_parser = parse_seconds, default_value = "15")]
    pub launching_stale_after: Duration,
    /// Kubernetes deletes a finished Job this many seconds later (a backstop).
    #[arg(long, env = "AGENT_BUS_JOB_TTL_SECONDS", default_value_t = 86_400)]
    pub job_ttl_seconds: i32,
    /// User and group id tasks run as (the `restricted` Pod Security profile forbids root).
    #[arg(long, env = "AGENT_BUS_RUN_AS_USER", default_value_t = 65_532)]
    pub run_as_user: i64,
    /// Kueue LocalQueue name to put on every Job (`kueue.x-k8s.io/queue-name`).
    #[arg(long, env = "AGENT_BUS_KUEUE_QUEUE")]
    pub kueue_queue_name: Option<String>,
    /// Identity of this process in queue consumer groups and the watcher lease (default:
    /// a random one).
    #[arg(long, env = "AGENT_BUS_INSTANCE")]
    pub instance: Option<String>,
    /// Name of the Lease the watchers elect their leader through.
    #[arg(
        long,
        env = "AGENT_BUS_LEASE_NAME",
        default_value = "agent-bus-watcher"
    )]
    pub lease_name: String,
    /// Namespace of that Lease (default: the tasks namespace).
    #[arg(long, env = "AGENT_BUS_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Annotation key prefixes tenants may set although they are in a reserved domain.
    /// Only for the test environment, whose kwok reads `agent-bus.io/test-*` pod
    /// annotations; never set it in production.
    #[arg(
        long,
        env = "AGENT_BUS_ALLOW_ANNOTATION_PREFIXES",
        value_delimiter = ','
    )]
    pub allow_annotation_prefix: Vec<String>,
    /// Work folder of the local executor (one sub-folder per task attempt).
    #[arg(
        long,
        env = "AGENT_BUS_LOCAL_WORKDIR",
        default_value = "agent-bus-work"
    )]
    pub local_workdir: PathBuf,
    #[command(flatten)]
    pub placement: PlacementArgs,
    #[command(flatten)]
    pub runner: RunnerArgs,
    #[command(flatten)]
    pub cost: CostArgs,
}

/// Prices, the cost alert and the stuck-task thresholds of the metrics (see
/// docs/OBSERVABILITY.md). GPU prices are the GPU classes' `price_per_hour`.
#[derive(Debug, Clone, Args)]
pub struct CostArgs {
    /// Dollars per CPU core-hour requested.
    #[arg(long, env = "AGENT_BUS_PRICE_CPU_CORE_HOUR", default_value_t = 0.04)]
    pub price_cpu_core_hour: f64,
    /// Dollars per GiB-hour of memory requested.
    #[arg(long, env = "AGENT_BUS_PRICE_MEMORY_GIB_HOUR", default_value_t = 0.005)]
    pub price_memory_gib_hour: f64,
    /// Running tasks costing more than this many dollars per hour in total fire
    /// AgentBusHighCostRate (exported as a gauge the rule compares with); 0 disables it.
    #[arg(
        long,
        env = "AGENT_BUS_COST_RATE_ALERT_DOLLARS_PER_HOUR",
        default_value_t = 500.0
    )]
    pub cost_rate_alert_dollars_per_hour: f64,
    /// A task queued longer than this counts in `agent_bus_stuck_tasks{reason="queued_too_long"}`.
    #[arg(long, env = "AGENT_BUS_QUEUED_TOO_LONG_AFTER", value_parser = parse_seconds, default_value = "600")]
    pub queued_too_long_after: Duration,
    /// How often at most `/metrics` reads the store for its state gauges.
    #[arg(long, env = "AGENT_BUS_METRICS_SNAPSHOT_SECONDS", value_parser = parse_seconds, default_value = "5")]
    pub metrics_snapshot_max_age: Duration,
}

/// Where tasks may run and what their pods get (see docs/GPU_WORKERS.md).
#[derive(Debug, Clone, Args)]
pub struct PlacementArgs {
    /// YAML file of GPU classes and shared volume claims (default: the built-in classes
    /// v100, a100, a100-mig-1g.10gb, h100 and no shared claims; see
    /// dispatcher/config/placement.yaml).
    #[arg(long, env = "AGENT_BUS_PLACEMENT_FILE")]
    pub placement_file: Option<PathBuf>,
    /// An ML/CV task without an explicit `shm` gets this share of its memory request as
    /// /dev/shm…
    #[arg(long, env = "AGENT_BUS_SHM_FRACTION", default_value_t = 0.25, value_parser = parse_fraction)]
    pub shm_fraction: f64,
    /// …at most this much (a Kubernetes quantity)…
    #[arg(long, env = "AGENT_BUS_SHM_CAP", default_value = "16Gi")]
    pub shm_cap: String,
    /// …and this much when it requests no memory.
    #[arg(long, env = "AGENT_BUS_SHM_WITHOUT_MEMORY", default_value = "1Gi")]
    pub shm_without_memory: String,
    /// StorageClass of per-task scratch volumes (default: the cluster's default class).
    #[arg(long, env = "AGENT_BUS_SCRATCH_STORAGE_CLASS")]
    pub scratch_storage_class: Option<String>,
    /// A pod no node of its GPU class took for this long moves to the class's next
    /// fallback, as a new attempt.
    #[arg(long, env = "AGENT_BUS_FALLBACK_AFTER", value_parser = parse_seconds, default_value = "300")]
    pub fallback_after: Duration,
}

/// The runner in every pod, and what the dispatcher expects of it.
#[derive(Debug, Clone, Args)]
pub struct RunnerArgs {
    /// URL at which task pods reach this dispatcher's API, e.g.
    /// http://agent-bus-api.agent-bus.svc:8080 (default with the local executor: the
    /// --listen address). Without it, Kubernetes tasks run but report nothing.
    #[arg(long, env = "AGENT_BUS_REPORT_URL")]
    pub report_url: Option<String>,
    /// Key that signs report tokens, at least 32 characters, the same on every replica
    /// (default: one generated once and kept in the database).
    #[arg(long, env = "AGENT_BUS_REPORT_SECRET", hide_env_values = true)]
    pub report_secret: Option<String>,
    /// Image of the init container that copies the runner into each pod.
    #[arg(long, env = "AGENT_BUS_RUNNER_IMAGE", default_value = concat!("ghcr.io/agent-bus/agent-bus:", env!("CARGO_PKG_VERSION")))]
    pub runner_image: String,
    /// Pull policy of that image (Always, IfNotPresent, Never; default: Kubernetes').
    #[arg(long, env = "AGENT_BUS_RUNNER_IMAGE_PULL_POLICY")]
    pub runner_image_pull_policy: Option<String>,
    /// The runner binary the local executor runs tasks through (default: `runner` next
    /// to the dispatcher's own executable, else on PATH).
    #[arg(long, env = "AGENT_BUS_RUNNER_PATH")]
    pub runner_path: Option<PathBuf>,
    /// Seconds between runner heartbeats.
    #[arg(long, env = "AGENT_BUS_HEARTBEAT_SECONDS", default_value_t = 15)]
    pub heartbeat_seconds: u32,
    /// A running task whose runner was silent this long gets reason `heartbeat_lost`.
    #[arg(long, env = "AGENT_BUS_HEARTBEAT_TIMEOUT", value_parser = parse_seconds, default_value = "90")]
    pub heartbeat_timeout: Duration,
    /// Also fail such a task (and delete its Job) instead of only showing the reason.
    #[arg(long, env = "AGENT_BUS_FAIL_ON_HEARTBEAT_LOST")]
    pub fail_on_heartbeat_lost: bool,
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value > 0.0 && value <= 1.0 => Ok(value),
        _ => Err(format!(
            "'{text}' is not a fraction between 0 (excluded) and 1"
        )),
    }
}

/// Whole seconds, as written in flags (`120`).
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("'{text}' is not a whole number of seconds"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
