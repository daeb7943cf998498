//! `bench` (package `agent-bus-bench`, run by `tests/bench` and, as `--smoke`, by the
//! smoke test under `make test`): what a user of agent-bus gets, measured against the
//! test environment (`eval "$(tests/env/up)"`: `KUBECONFIG`, `DATABASE_URL`, `REDIS_URL`).
//! Each part starts dispatcher processes of its own (fresh databases, namespaces and key
//! prefixes) and removes them after:
//!
//! - (a) open-loop submit→Job latency at fixed arrival rates, with a breakdown by stage
//!   (`latency`, `stages`);
//! - (b) saturated throughput against kube-rs creating the same Jobs, interleaved rounds;
//! - (c) the API alone (`--roles api`) at 200/500/1000 requests/s on both stores;
//! - (d) the pipeline with the create stubbed out (`--executor stub`);
//! - (e) resident memory idle and with many active Jobs;
//! - (f) with `--million`, submit latency and dispatch rate with a million queued.
//!
//! Markdown tables go to stdout, then a goals table, then one line of JSON with the
//! headline figures (the last line). Progress goes to stderr.

mod capacity;
mod harness;
mod latency;
mod load;
mod report;
mod stages;

use std::time::Duration;

use clap::Parser;
use dispatcher::task::TaskSpec;
use dispatcher::task::submission::{Limits, Submission, validate};
use kube::Client;

use harness::Env;

/// Measures agent-bus against the issue-15 goals (docs/BENCHMARKS.md).
#[derive(Debug, Parser)]
struct Args {
    /// A few seconds of each part with tiny counts, for CI: proves the bench still runs,
    /// measures nothing worth reading.
    #[arg(long)]
    smoke: bool,
    /// Also (f): submit latency and dispatch rate with a million tasks queued (minutes;
    /// never in CI).
    #[arg(long)]
    million: bool,
    /// Only (f), the million-queued part: prints its section and its JSON.
    #[arg(long)]
    only_million: bool,
    /// Seconds of each open-loop step.
    #[arg(long)]
    step_seconds: Option<f64>,
    /// Rounds of direct-then-agent-bus for the throughput ratio.
    #[arg(long)]
    rounds: Option<usize>,
    /// Tasks per throughput round.
    #[arg(long)]
    ratio_tasks: Option<usize>,
    /// Active Jobs for the memory figure.
    #[arg(long)]
    active_jobs: Option<usize>,
    /// The dispatcher binary to measure.
    #[arg(long, default_value = "target/release/dispatcher")]
    dispatcher: std::path::PathBuf,
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: std::path::PathBuf,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
}

/// How big each part is: the full run's defaults, or the smoke's.
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    /// (a) arrival rates; doubled past the last until saturated or `max_rate`.
    pub(crate) rates: Vec<u32>,
    pub(crate) max_rate: u32,
    /// Length of each open-loop step.
    pub(crate) step: Duration,
    /// How long an answer may take before it counts as not answered.
    pub(crate) request_timeout: Duration,
    /// How long to wait after a step for the Jobs (or launches) still to come.
    pub(crate) drain: Duration,
    /// (b)
    pub(crate) rounds: usize,
    pub(crate) ratio_tasks: usize,
    pub(crate) concurrency: usize,
    /// (c)
    pub(crate) api_rates: Vec<u32>,
    /// (d)
    pub(crate) stub_tasks: usize,
    /// (e)
    pub(crate) active_jobs: usize,
    /// (f)
    pub(crate) million: usize,
    pub(crate) million_rate: u32,
    pub(crate) small_backlog: usize,
    pub(crate) dispatch_window: Duration,
}

impl Sizes {
    fn of(args: &Args) -> Self {
        let mut sizes = if args.smoke {
            Self {
                rates: vec![10, 20],
                max_rate: 20,
                step: Duration::from_secs(1),
                request_timeout: Duration::from_secs(5),
                drain: Duration::from_secs(30),
                rounds: 1,
                ratio_tasks: 20,
                concurrency: 8,
                api_rates: vec![50],
                stub_tasks: 100,
                active_jobs: 30,
                million: 2_000,
                million_rate: 20,
                small_backlog: 200,
                dispatch_window: Duration::from_secs(3),
            }
        } else {
            Self {
                rates: vec![10, 20, 50, 100, 200],
                max_rate: 1600,
                step: Duration::from_secs(10),
                request_timeout: Duration::from_secs(5),
                drain: Duration::from_mins(1),
                rounds: 3,
                ratio_tasks: 500,
                concurrency: 32,
                api_rates: vec![200, 500, 1000],
                stub_tasks: 10_000,
                active_jobs: 10_000,
                million: 1_000_000,
                million_rate: 200,
                small_backlog: 10_000,
                dispatch_window: Duration::from_secs(20),
            }
        };
        if let Some(seconds) = args.step_seconds {
            sizes.step = Duration::from_secs_f64(seconds);
        }
        sizes.rounds = args.rounds.unwrap_or(sizes.rounds);
        sizes.ratio_tasks = args.ratio_tasks.unwrap_or(sizes.ratio_tasks);
        sizes.active_jobs = args.active_jobs.unwrap_or(sizes.active_jobs);
        sizes
    }
}

/// The task every part launches: small, CPU only.
pub(crate) fn bench_spec() -> anyhow::Result<TaskSpec> {
    let submission = Submission {
        name: "bench".into(),
        image: "registry.invalid/bench:1".into(),
        command: vec!["true".into()],
        resources: dispatcher::task::submission::ResourcesInput {
            cpu: Some("100m".into()),
            memory: Some("64Mi".into()),
            gpu: None,
        },
        ..Submission::default()
    };
    Ok(validate(submission, &Limits::default(), "bench")?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sizes = Sizes::of(&args);
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let env = Env {
        dispatcher: args.dispatcher.clone(),
        kubeconfig: args.kubeconfig.clone(),
        database_url: args.database_url.clone(),
        redis_url: args.redis_url.clone(),
        client: Client::try_from(config)?,
        suffix: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
    };
    eprintln!(
        "bench: {}{}",
        if args.smoke { "smoke" } else { "full run" },
        if args.million { ", with --million" } else { "" }
    );

    if args.only_million {
        let million = capacity::with_a_million(&env, &sizes).await?;
        print!("{}", report::million_markdown(&million));
        println!("{}", report::million_summary(&million));
        return Ok(());
    }
    let (steps, idle_rss) = latency::latency_at_rates(&env, &sizes).await?;
    let ratio = latency::ratio_against_direct(&env, &sizes).await?;
    let api = capacity::api_alone(&env, &sizes).await?;
    let stubbed = capacity::stubbed_pipeline(&env, &sizes).await?;
    let (rss_active, active_jobs) = capacity::rss_with_jobs(&env, &sizes).await?;
    let million = if args.million {
        Some(capacity::with_a_million(&env, &sizes).await?)
    } else {
        None
    };

    let results = report::Results {
        steps,
        ratio,
        api,
        stubbed,
        idle_rss,
        rss_active,
        active_jobs,
        million,
    };
    print!("{}", report::markdown(&results, &sizes));
    println!("{}", report::summary(&results));
    Ok(())
}
