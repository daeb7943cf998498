//! The flags of `dispatcher serve`: where it listens and stores, where tasks run, the
//! placement, the runner and the cost figures.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

use super::lease::LeaseArgs;
use super::values::{self, duration_default, parse_dollars, parse_duration, parse_fraction};
use super::{DatabaseArgs, ExecutorChoice, Role};
use crate::api::ReportLimits;
use crate::cost::Prices;
use crate::launcher::job_spec::{
    DEFAULT_HEARTBEAT, DEFAULT_NAMESPACE, DEFAULT_RUN_AS_USER, DEFAULT_RUNNER_IMAGE,
    DEFAULT_TTL_AFTER_FINISHED, ImagePullPolicy,
};
use crate::metrics::snapshot::SnapshotConfig;
use crate::store::{LogLimits, ReportAllowance};
use crate::task::retry::{MAX_BACKOFF_CAP_SECONDS, MAX_BACKOFF_SECONDS, RetryDefaults};
use crate::task::submission::{KeyPrefix, Limits, MAX_QUEUE_TTL_SECONDS, ShmRule};
use crate::task::{Cpu, Memory};

/// Where the metrics listener listens by default: loopback only, on a port no other part
/// of agent-bus or its docker-compose set (Prometheus takes 9090 there) uses.
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// The first user id of the local executor's tasks (as root): far above the ids of
/// people and system services, and below the ranges container runtimes and systemd
/// hand out.
const DEFAULT_TASK_UID_BASE: u32 = 2_000_000_000;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the HTTP API listens on.
    #[arg(long, env = "AGENT_BUS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address the metrics listener serves `/metrics` on (and `/healthz`, `/readyz`).
    /// The metrics name every tenant, queue and model: keep this address off the Ingress
    /// and out of task pods' reach. Port 0 picks a free port (logged).
    #[arg(long, env = "AGENT_BUS_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Redis for the queue (`redis://host:port`); without it, an in-process queue is used
    /// (single dispatcher process only). Its value (it may hold a password) is never
    /// shown in --help.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_parser = values::secret)]
    pub redis_url: Option<SecretString>,
    /// PEM file of the CA (or CAs) that signed the Redis server's certificate, for a
    /// `rediss://` URL: the certificate is checked against it instead of the public roots
    /// built in, and must name the URL's host. Needs --redis-url.
    #[arg(long, env = "AGENT_BUS_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// Prefix of every Redis key the dispatcher writes.
    #[arg(long, env = "AGENT_BUS_REDIS_PREFIX", default_value = "agent-bus:")]
    pub redis_prefix: String,
    /// Where tasks run.
    #[arg(long, env = "AGENT_BUS_EXECUTOR", value_enum, default_value_t = ExecutorChoice::Auto)]
    pub executor: ExecutorChoice,
    /// Kubeconfig for the Kubernetes executor; without it, the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes API requests a second this process sends on average (a token bucket,
    /// as client-go's `--kube-api-qps`); more wait their turn in the client.
    #[arg(long, env = "AGENT_BUS_KUBE_API_QPS", default_value_t = NonZeroU32::new(crate::k8s::rate_limit::DEFAULT_QPS).unwrap_or(NonZeroU32::MIN))]
    pub kube_api_qps: NonZeroU32,
    /// Kubernetes API requests this process may send at once after a quiet spell.
    #[arg(long, env = "AGENT_BUS_KUBE_API_BURST", default_value_t = NonZeroU32::new(crate::k8s::rate_limit::DEFAULT_BURST).unwrap_or(NonZeroU32::MIN))]
    pub kube_api_burst: NonZeroU32,
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
    #[arg(long, env = "AGENT_BUS_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Roles this process runs, comma-separated.
    #[arg(long, env = "AGENT_BUS_ROLES", value_enum, value_delimiter = ',', default_values_t = [Role::Api, Role::Launcher, Role::Watcher])]
    pub roles: Vec<Role>,
    /// Largest accepted request body, in bytes; larger ones get 413.
    #[arg(long, env = "AGENT_BUS_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// API requests handled at once by this process; one more is answered 503
    /// `overloaded` with `Retry-After: 1` at once instead of waiting (the probes and
    /// /metrics are never refused).
    #[arg(long, env = "AGENT_BUS_MAX_IN_FLIGHT_REQUESTS", default_value_t = crate::api::admission::DEFAULT_MAX_IN_FLIGHT, value_parser = values::parse_count_limit)]
    pub max_in_flight_requests: usize,
    /// Followed streams (`events?follow=true`, `logs?follow=true`) one tenant may hold
    /// open in this process; one more is refused with 429 `too_many_streams`.
    #[arg(long, env = "AGENT_BUS_MAX_STREAMS_PER_TENANT", default_value_t = crate::api::streams::DEFAULT_MAX_PER_TENANT, value_parser = values::parse_count_limit)]
    pub max_streams_per_tenant: usize,
    /// How long one followed stream may stay open; it then ends and the client
    /// reconnects (the CLI does).
    #[arg(long, env = "AGENT_BUS_MAX_STREAM_DURATION", value_parser = parse_duration, default_value = duration_default!(crate::api::streams::DEFAULT_MAX_DURATION))]
    pub max_stream_duration: Duration,
    /// Job creations in flight at once, per launcher.
    #[arg(long, env = "AGENT_BUS_LAUNCH_CONCURRENCY", default_value_t = 32)]
    pub launch_concurrency: usize,
    /// A pod unschedulable this long gives its task the visible reason `unschedulable`.
    #[arg(long, env = "AGENT_BUS_UNSCHEDULABLE_AFTER", value_parser = parse_duration, default_value = "120s")]
    pub unschedulable_after: Duration,
    /// How often reconcilers compare the store with the queue and the cluster.
    #[arg(long, env = "AGENT_BUS_RECONCILE_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub reconcile_interval: Duration,
    /// A task still `launching` after this long is launched again (idempotently: its Job
    /// name is fixed, so a Job created before a crash is found, not duplicated).
    #[arg(long, env = "AGENT_BUS_LAUNCHING_STALE_AFTER", value_parser = parse_duration, default_value = "15s")]
    pub launching_stale_after: Duration,
    /// The longest wait between two creates of a task whose Job the namespace's
    /// ResourceQuota refused (it waits `launching` with reason `cluster_quota`); the wait
    /// starts at --launching-stale-after and doubles with each refusal.
    #[arg(long, env = "AGENT_BUS_CLUSTER_QUOTA_RETRY_MAX", value_parser = parse_duration, default_value = "60s")]
    pub cluster_quota_retry_max: Duration,
    /// How long the Job of a task whose outcome is recorded is kept (for `kubectl`
    /// users) before the watcher deletes it; 0 deletes it at once. A Job still running
    /// for an ended task (cancelled, heartbeat lost) is deleted at once regardless.
    #[arg(long, env = "AGENT_BUS_KEEP_FINISHED_JOBS", value_parser = parse_duration, default_value = "0s")]
    pub keep_finished_jobs: Duration,
    /// Kubernetes deletes a finished Job this many seconds later (a backstop: the
    /// watcher deletes it once its outcome is recorded, see --keep-finished-jobs).
    #[arg(long, env = "AGENT_BUS_JOB_TTL_SECONDS", value_parser = parse_duration, default_value = duration_default!(DEFAULT_TTL_AFTER_FINISHED))]
    pub job_ttl_seconds: Duration,
    /// User and group id tasks run as (the `restricted` Pod Security profile forbids root).
    #[arg(long, env = "AGENT_BUS_RUN_AS_USER", default_value_t = DEFAULT_RUN_AS_USER)]
    pub run_as_user: i64,
    /// Kueue LocalQueue name to put on every Job (`kueue.x-k8s.io/queue-name`).
    #[arg(long, env = "AGENT_BUS_KUEUE_QUEUE")]
    pub kueue_queue_name: Option<String>,
    /// Identity of this process in queue consumer groups and the watcher lease (default:
    /// a random one).
    #[arg(long, env = "AGENT_BUS_INSTANCE")]
    pub instance: Option<String>,
    /// Work folder of the local executor (one sub-folder per task attempt). Default:
    /// `agent-bus-work` in the current folder; as root, when other users cannot reach
    /// that (a home folder that is 0700), /var/lib/agent-bus/work, since each tenant's
    /// tasks run as a user of its own and must reach their folders.
    #[arg(long, env = "AGENT_BUS_LOCAL_WORKDIR")]
    pub local_workdir: Option<PathBuf>,
    /// As root, the local executor runs each tenant's tasks as user and group id BASE + n,
    /// n being the tenant's slot (given once per tenant, never reused); the ids need no
    /// /etc/passwd entries.
    #[arg(long, env = "AGENT_BUS_LOCAL_TASK_UID_BASE", default_value_t = DEFAULT_TASK_UID_BASE,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub local_task_uid_base: u32,
    /// Let a dispatcher that is not root run local tasks of more than one tenant, or
    /// listen beyond loopback, although every task then runs as the dispatcher's own user
    /// and can read its database, its report-token key and the other tasks' files.
    /// Without it, such a dispatcher refuses to start (and to run tasks of a second
    /// tenant created meanwhile).
    #[arg(long, env = "AGENT_BUS_LOCAL_EXECUTOR_SHARED_USER")]
    pub local_executor_shared_user: bool,
    /// Where the local executor keeps the tenants' secrets (`PUT /v1/secrets/{name}`):
    /// one file per secret, readable by the dispatcher's user only (folders 0700, files
    /// 0600). With the Kubernetes executor, secrets are Secrets in --namespace instead.
    #[arg(
        long,
        env = "AGENT_BUS_LOCAL_SECRETS_DIR",
        default_value = "agent-bus-secrets"
    )]
    pub local_secrets_dir: PathBuf,
    #[command(flatten)]
    pub lease: LeaseArgs,
    #[command(flatten)]
    pub submissions: SubmissionArgs,
    #[command(flatten)]
    pub placement: PlacementArgs,
    #[command(flatten)]
    pub runner: RunnerArgs,
    #[command(flatten)]
    pub cost: CostArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
}

/// Webhook deliveries (docs/WEBHOOKS.md): where they may go, and how long they are tried.
#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// Hosts webhooks may point to, comma-separated (names or IP literals): only these,
    /// at whatever address they resolve to, private ones included (how an in-cluster
    /// receiver is allowed). Without it, any host whose addresses are public: loopback,
    /// private, link-local (cloud metadata), CGNAT, multicast and unspecified addresses
    /// are refused.
    #[arg(long, env = "AGENT_BUS_WEBHOOK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub webhook_allowed_hosts: Vec<String>,
    /// How long one delivery request may take (connecting takes at most half of it).
    #[arg(long, env = "AGENT_BUS_WEBHOOK_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub webhook_timeout: Duration,
    /// How long a delivery is retried (exponential backoff with jitter) before it is
    /// given up.
    #[arg(long, env = "AGENT_BUS_WEBHOOK_RETRY_FOR", value_parser = parse_duration, default_value = "24h")]
    pub webhook_retry_for: Duration,
    /// The wait before the first retry; each retry waits twice as long, at most an hour.
    #[arg(long, env = "AGENT_BUS_WEBHOOK_BACKOFF", value_parser = parse_duration, default_value = "5s")]
    pub webhook_backoff: Duration,
    /// PEM certificates trusted for `https` deliveries besides the Mozilla roots: the CA
    /// of an in-cluster receiver (allowed with --webhook-allowed-hosts).
    #[arg(long, env = "AGENT_BUS_WEBHOOK_CA_FILE", value_name = "PATH")]
    pub webhook_ca_file: Option<PathBuf>,
}

/// What a tenant's submission may ask for (see the README's quickstart): which labels and
/// annotations reach its pod, and the most resources one task may request.
#[derive(Debug, Clone, Args)]
pub struct SubmissionArgs {
    /// The queues tasks may name, comma-separated (`default` is always one): a task naming
    /// another is refused (422, field `queue`). By default any queue name (a DNS label)
    /// is taken, and each new one adds streams every launcher reads.
    #[arg(long, env = "AGENT_BUS_QUEUES", value_delimiter = ',', value_name = "QUEUE", value_parser = values::parse_queue_name)]
    pub queues: Vec<String>,
    /// Label key prefixes tenants may use, comma-separated: a DNS subdomain and '/'
    /// (`example.com/`), optionally with the start of the name (`example.com/team-`).
    /// By default none: every tenant label is refused (422). Keys without a prefix and
    /// kubernetes.io, k8s.io, *.x-k8s.io and agent-bus.io (with their subdomains) are
    /// refused whatever is listed here.
    #[arg(
        long,
        env = "AGENT_BUS_TENANT_LABEL_PREFIXES",
        value_delimiter = ',',
        value_name = "PREFIX"
    )]
    pub tenant_label_prefixes: Vec<KeyPrefix>,
    /// Annotation key prefixes tenants may use, comma-separated, as for
    /// --tenant-label-prefixes. By default none: runtime, CNI, service-mesh and secret
    /// injector annotations (`io.kubernetes.cri-o.*`, `k8s.v1.cni.cncf.io/`,
    /// `sidecar.istio.io/`, `vault.hashicorp.com/`) are refused unless listed. The one
    /// reserved prefix that may be listed is `agent-bus.io/test-`, which the test
    /// environment's kwok reads; never list it in production.
    #[arg(
        long,
        env = "AGENT_BUS_TENANT_ANNOTATION_PREFIXES",
        value_delimiter = ',',
        value_name = "PREFIX"
    )]
    pub tenant_annotation_prefixes: Vec<KeyPrefix>,
    /// The most CPU one task may request (a Kubernetes quantity); more is refused (422).
    #[arg(long, env = "AGENT_BUS_MAX_TASK_CPU", default_value_t = Limits::DEFAULT_MAX_CPU)]
    pub max_task_cpu: Cpu,
    /// The most memory one task may request; more is refused (422).
    #[arg(long, env = "AGENT_BUS_MAX_TASK_MEMORY", default_value_t = Limits::DEFAULT_MAX_MEMORY)]
    pub max_task_memory: Memory,
    /// The most GPUs one task may request, of any class (a class whose nodes hold fewer
    /// refuses more than they hold).
    #[arg(long, env = "AGENT_BUS_MAX_TASK_GPUS", default_value_t = Limits::DEFAULT_MAX_GPUS,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_task_gpus: u32,
    /// The largest /dev/shm one task may ask for; at most --max-task-memory (shm is
    /// memory).
    #[arg(long, env = "AGENT_BUS_MAX_TASK_SHM", default_value_t = Limits::DEFAULT_MAX_SHM)]
    pub max_task_shm: Memory,
    /// The longest queue TTL one task may ask for (`queue_ttl_seconds`), in seconds; more
    /// is refused (422). A tenant's default queue TTL is the operator's own choice and
    /// is not held to it.
    #[arg(long, env = "AGENT_BUS_MAX_TASK_QUEUE_TTL_SECONDS", default_value_t = MAX_QUEUE_TTL_SECONDS,
          value_parser = super::queue_ttl_seconds())]
    pub max_task_queue_ttl_seconds: u32,
}

/// How failed attempts are retried when a task's own retry policy does not say (see
/// docs/LIFECYCLE.md). The default rules are built in: disruptions (eviction, a lost Job)
/// retry for free, `oom` grows memory, `cuda_oom` moves to a GPU class with more memory
/// (the placement file's `gpu_memory_order`), `xid` avoids the node, a refused launch or
/// an image pull failure fails at once, anything else retries while retries are left.
#[derive(Debug, Clone, Args)]
// The flags read as `--retry-…`; the field names are the flags.
#[allow(clippy::struct_field_names)]
pub struct RetryArgs {
    /// The first backoff before a retry, in seconds; it doubles per retry.
    #[arg(long, env = "AGENT_BUS_RETRY_BACKOFF_SECONDS", default_value_t = RetryDefaults::default().backoff_seconds,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_BACKOFF_SECONDS)))]
    pub retry_backoff_seconds: u32,
    /// The longest backoff, in seconds.
    #[arg(long, env = "AGENT_BUS_RETRY_MAX_BACKOFF_SECONDS", default_value_t = RetryDefaults::default().max_backoff_seconds,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BACKOFF_CAP_SECONDS)))]
    pub retry_max_backoff_seconds: u32,
    /// A retry after `oom` never asks for more memory than this.
    #[arg(long, env = "AGENT_BUS_RETRY_MAX_MEMORY", default_value_t = RetryDefaults::default().max_memory)]
    pub retry_max_memory: Memory,
    /// How many free retries (rule action `ignore`: evictions, lost Jobs) a task gets
    /// before they count against its `max_retries`.
    #[arg(long, env = "AGENT_BUS_RETRY_MAX_FREE", default_value_t = RetryDefaults::default().max_ignored_attempts,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub retry_max_free: u32,
}

impl RetryArgs {
    /// The retry defaults these flags set, with the built-in rules.
    #[must_use]
    pub fn defaults(&self) -> RetryDefaults {
        RetryDefaults {
            backoff_seconds: self.retry_backoff_seconds,
            max_backoff_seconds: self
                .retry_max_backoff_seconds
                .max(self.retry_backoff_seconds),
            max_memory: self.retry_max_memory,
            max_ignored_attempts: self.retry_max_free,
            ..RetryDefaults::default()
        }
    }
}

/// Prices, the cost alert and the stuck-task thresholds of the metrics (see
/// docs/OBSERVABILITY.md). GPU prices are the GPU classes' `price_per_hour`.
#[derive(Debug, Clone, Args)]
pub struct CostArgs {
    /// Dollars per CPU core-hour requested.
    #[arg(long, env = "AGENT_BUS_PRICE_CPU_CORE_HOUR", default_value_t = Prices::DEFAULT_CPU_CORE_HOUR)]
    pub price_cpu_core_hour: f64,
    /// Dollars per GiB-hour of memory requested.
    #[arg(long, env = "AGENT_BUS_PRICE_MEMORY_GIB_HOUR", default_value_t = Prices::DEFAULT_MEMORY_GIB_HOUR)]
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
    #[arg(long, env = "AGENT_BUS_QUEUED_TOO_LONG_AFTER", value_parser = parse_duration, default_value = duration_default!(SnapshotConfig::DEFAULT_QUEUED_TOO_LONG))]
    pub queued_too_long_after: Duration,
    /// How often at most `/metrics` reads the store for its state gauges.
    #[arg(long, env = "AGENT_BUS_METRICS_SNAPSHOT_SECONDS", value_parser = parse_duration, default_value = duration_default!(SnapshotConfig::DEFAULT_MAX_AGE))]
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
    #[arg(long, env = "AGENT_BUS_SHM_FRACTION", default_value_t = ShmRule::DEFAULT.fraction, value_parser = parse_fraction)]
    pub shm_fraction: f64,
    /// …at most this much (a Kubernetes quantity)…
    #[arg(long, env = "AGENT_BUS_SHM_CAP", default_value_t = ShmRule::DEFAULT.cap)]
    pub shm_cap: Memory,
    /// …and this much when it requests no memory.
    #[arg(long, env = "AGENT_BUS_SHM_WITHOUT_MEMORY", default_value_t = ShmRule::DEFAULT.without_memory_request)]
    pub shm_without_memory: Memory,
    /// StorageClass of per-task scratch volumes (default: the cluster's default class).
    #[arg(long, env = "AGENT_BUS_SCRATCH_STORAGE_CLASS")]
    pub scratch_storage_class: Option<String>,
    /// A pod no node of its GPU class took for this long moves to the class's next
    /// fallback, as a new attempt.
    #[arg(long, env = "AGENT_BUS_FALLBACK_AFTER", value_parser = parse_duration, default_value = "300s")]
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
    #[arg(long, env = "AGENT_BUS_REPORT_SECRET", hide_env_values = true, value_parser = values::secret)]
    pub report_secret: Option<SecretString>,
    /// Image of the init container that copies the runner into each pod.
    #[arg(long, env = "AGENT_BUS_RUNNER_IMAGE", default_value = DEFAULT_RUNNER_IMAGE)]
    pub runner_image: String,
    /// Pull policy of that image (Always, IfNotPresent, Never; default: Kubernetes').
    #[arg(
        long,
        env = "AGENT_BUS_RUNNER_IMAGE_PULL_POLICY",
        value_enum,
        hide_possible_values = true
    )]
    pub runner_image_pull_policy: Option<ImagePullPolicy>,
    /// The runner binary the local executor runs tasks through (default: `runner` next
    /// to the dispatcher's own executable, else on PATH).
    #[arg(long, env = "AGENT_BUS_RUNNER_PATH")]
    pub runner_path: Option<PathBuf>,
    /// Seconds between runner heartbeats.
    #[arg(long, env = "AGENT_BUS_HEARTBEAT_SECONDS", value_parser = parse_duration, default_value = duration_default!(DEFAULT_HEARTBEAT))]
    pub heartbeat_seconds: Duration,
    /// A running task whose runner was silent this long gets reason `heartbeat_lost`.
    #[arg(long, env = "AGENT_BUS_HEARTBEAT_TIMEOUT", value_parser = parse_duration, default_value = "90s")]
    pub heartbeat_timeout: Duration,
    /// Also fail such a task (and delete its Job) instead of only showing the reason.
    #[arg(long, env = "AGENT_BUS_FAIL_ON_HEARTBEAT_LOST")]
    pub fail_on_heartbeat_lost: bool,
    /// Progress and usage reports one task attempt may send; more get 429.
    #[arg(long, env = "AGENT_BUS_MAX_REPORTS_PER_ATTEMPT", default_value_t = ReportAllowance::default().max_reports)]
    pub max_reports_per_attempt: u64,
    /// Bytes of progress and usage reports one task attempt may send; more get 429.
    #[arg(long, env = "AGENT_BUS_MAX_REPORT_BYTES_PER_ATTEMPT", default_value_t = ReportAllowance::default().max_bytes)]
    pub max_report_bytes_per_attempt: u64,
    /// The most dollars one usage report may carry; more get 422.
    #[arg(long, env = "AGENT_BUS_MAX_REPORT_COST_USD", default_value_t = ReportLimits::default().max_cost_usd, value_parser = parse_dollars)]
    pub max_report_cost_usd: f64,
    /// How long after its attempt ended a runner may still report (its last reports);
    /// later reports get 409.
    #[arg(long, env = "AGENT_BUS_REPORTS_AFTER_END", value_parser = parse_duration, default_value = "2m")]
    pub reports_after_end: Duration,
    /// Bytes of output lines kept per task attempt (separate from the report
    /// allowance); past it a marker line says the rest was not kept (docs/LOGS.md).
    #[arg(long, env = "AGENT_BUS_MAX_LOG_BYTES_PER_ATTEMPT", default_value_t = LogLimits::default().max_bytes)]
    pub max_log_bytes_per_attempt: u64,
    /// How long the output lines of a task are kept after it ended; a periodic sweep
    /// deletes older ones.
    #[arg(long, env = "AGENT_BUS_LOG_RETENTION", value_parser = parse_duration, default_value = "168h")]
    pub log_retention: Duration,
    /// How long an ended task is kept (with its events, attempts, reports, output and
    /// webhook deliveries) after it ended (2160h: 90 days); a periodic sweep deletes older
    /// ones, and their idempotency keys become free. At least 768h (32 days), so this
    /// month's spend and budgets stay whole; 0 keeps tasks forever.
    #[arg(long, env = "AGENT_BUS_TASK_RETENTION", value_parser = parse_task_retention, default_value = "2160h")]
    pub task_retention: Duration,
}

/// `--task-retention`: 0 (keep forever) or at least 32 days.
fn parse_task_retention(text: &str) -> Result<Duration, String> {
    let retention = parse_duration(text)?;
    if !retention.is_zero() && retention < crate::report::retention::MIN_TASK_RETENTION {
        return Err(format!(
            "'{text}' is shorter than 32 days (768h): a month's spend and budgets are summed from the tasks kept (0 keeps tasks forever)"
        ));
    }
    Ok(retention)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser as _;

    use super::ServeArgs;
    use crate::config::{Cli, Command};
    use crate::cost::Prices;
    use crate::launcher::job_spec::{ImagePullPolicy, LaunchConfig};
    use crate::metrics::snapshot::SnapshotConfig;
    use crate::task::submission::ShmRule;

    fn serve(args: &[&str]) -> Box<ServeArgs> {
        let cli = Cli::try_parse_from([&["dispatcher", "serve"], args].concat()).unwrap();
        match cli.command {
            Command::Serve(args) => args,
            other => panic!("{other:?}"),
        }
    }

    /// What clap says when it refuses `serve ARGS`.
    fn refused(args: &[&str]) -> String {
        Cli::try_parse_from([&["dispatcher", "serve"], args].concat())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn declared_queues_are_dns_labels() {
        assert!(serve(&[]).submissions.queues.is_empty());
        assert_eq!(
            serve(&["--queues", "gpu,batch"]).submissions.queues,
            ["gpu", "batch"]
        );
        let said = refused(&["--queues", "gpu,GPU_2"]);
        assert!(
            said.contains("--queues") && said.contains("'GPU_2' is not a queue name"),
            "{said}"
        );
    }

    #[test]
    fn the_task_retention_keeps_a_month_or_everything() {
        assert_eq!(
            serve(&[]).runner.task_retention,
            Duration::from_hours(90 * 24)
        );
        assert_eq!(
            serve(&["--task-retention", "0"]).runner.task_retention,
            Duration::ZERO
        );
        assert_eq!(
            serve(&["--task-retention", "768h"]).runner.task_retention,
            Duration::from_hours(32 * 24)
        );
        let said = refused(&["--task-retention", "168h"]);
        assert!(
            said.contains("--task-retention") && said.contains("shorter than 32 days"),
            "{said}"
        );
    }

    #[test]
    fn serve_defaults_are_the_library_defaults() {
        let args = serve(&[]);
        let launch = LaunchConfig::default();
        assert_eq!(args.namespace, launch.namespace);
        assert_eq!(args.job_ttl_seconds, launch.ttl_after_finished);
        assert_eq!(args.run_as_user, launch.run_as_user);
        assert_eq!(args.runner.runner_image, launch.runner.image);
        assert_eq!(args.runner.runner_image_pull_policy, None);
        assert_eq!(args.runner.heartbeat_seconds, launch.runner.heartbeat);
        let shm = ShmRule::default();
        // Exactly the same number: the default is printed and parsed back.
        assert_eq!(
            args.placement.shm_fraction.to_bits(),
            shm.fraction.to_bits()
        );
        assert_eq!(args.placement.shm_cap, shm.cap);
        assert_eq!(
            args.placement.shm_without_memory,
            shm.without_memory_request
        );
        let snapshot = SnapshotConfig::default();
        assert_eq!(args.cost.metrics_snapshot_max_age, snapshot.max_age);
        assert_eq!(args.cost.queued_too_long_after, snapshot.queued_too_long);
        assert_eq!(
            args.cost.price_cpu_core_hour.to_bits(),
            Prices::DEFAULT_CPU_CORE_HOUR.to_bits()
        );
        assert_eq!(
            args.cost.price_memory_gib_hour.to_bits(),
            Prices::DEFAULT_MEMORY_GIB_HOUR.to_bits()
        );
        assert_eq!(args.unschedulable_after, Duration::from_mins(2));
        assert_eq!(args.runner.heartbeat_timeout, Duration::from_secs(90));
        assert_eq!(args.keep_finished_jobs, Duration::ZERO);
        assert_eq!(args.cluster_quota_retry_max, Duration::from_mins(1));
    }

    #[test]
    fn secrets_are_kept_as_secrets_and_debug_never_prints_them() {
        use secrecy::ExposeSecret;
        let args = serve(&[
            "--database-url",
            "postgres://u:hunter2@h/db",
            "--redis-url",
            "redis://:hunter2@h",
            "--report-secret",
            "hunter2hunter2hunter2hunter2hunter2",
        ]);
        assert_eq!(
            args.database.database_url.expose_secret(),
            "postgres://u:hunter2@h/db"
        );
        assert_eq!(
            args.redis_url.as_ref().map(ExposeSecret::expose_secret),
            Some("redis://:hunter2@h")
        );
        let debug = format!("{args:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn flags_are_parsed_into_their_types() {
        let args = serve(&[
            "--job-ttl-seconds",
            "3600",
            "--heartbeat-seconds",
            "1m",
            "--runner-image-pull-policy",
            "IfNotPresent",
            "--shm-cap",
            "8Gi",
            "--keep-finished-jobs",
            "10m",
        ]);
        assert_eq!(args.keep_finished_jobs, Duration::from_mins(10));
        assert_eq!(args.job_ttl_seconds, Duration::from_hours(1));
        assert_eq!(args.runner.heartbeat_seconds, Duration::from_mins(1));
        assert_eq!(
            args.runner.runner_image_pull_policy,
            Some(ImagePullPolicy::IfNotPresent)
        );
        assert_eq!(args.placement.shm_cap.to_string(), "8Gi");
        for bad in [
            ["--runner-image-pull-policy", "Sometimes"],
            ["--shm-cap", "lots"],
            ["--reconcile-interval", "1.5s"],
        ] {
            let error = refused(&bad);
            assert!(error.contains(bad[0]), "{bad:?}: {error}");
        }
    }
}
