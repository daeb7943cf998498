//! Submit to Job: (a) open-loop latency at fixed arrival rates with a per-stage
//! breakdown, until the dispatcher saturates; (b) saturated throughput against kube-rs
//! creating the same Jobs directly, in interleaved rounds (direct, agent-bus, direct,
//! agent-bus, …) so that drift of the shared machine hits both alike.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatcher::launcher::job_spec::{LaunchConfig, build_job};
use dispatcher::task::Task;
use futures::StreamExt as _;
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::PostParams;

use crate::harness::{Backend, Dispatcher, Env, Seen, Spec, create_namespace, delete_namespace};
use crate::load::{Outcome, median, now_ms, percentile};
use crate::stages::{self, Breakdown};
use crate::{Sizes, bench_spec};

/// One arrival rate of (a).
#[derive(Debug)]
pub(crate) struct RateStep {
    pub(crate) rate: u32,
    pub(crate) outcome: Outcome,
    /// Jobs seen of the accepted tasks.
    pub(crate) seen: usize,
    /// Jobs seen a second, from the first send to the last Job seen.
    pub(crate) achieved: f64,
    pub(crate) breakdown: Breakdown,
    /// Operation means (ms) and counts from /metrics over the step.
    pub(crate) means: Vec<(String, f64, f64)>,
    pub(crate) saturated: bool,
}

impl RateStep {
    /// Submit→Job p50 and p99, ms.
    pub(crate) fn job_seen(&self) -> (f64, f64) {
        let last = stages::STAGES.len() - 1;
        (self.breakdown.p50[last], self.breakdown.p99[last])
    }
}

/// (a): a fresh dispatcher (PostgreSQL, Redis, the Kubernetes executor) for each rate in
/// `sizes.rates`, then doubling until one saturates: fewer than 99 % accepted or Jobs
/// seen, or Jobs appearing at under 90 % of the offered rate. Also gives the dispatcher's RSS
/// idle (MiB), taken before the first step's load.
pub(crate) async fn latency_at_rates(
    env: &Env,
    sizes: &Sizes,
) -> anyhow::Result<(Vec<RateStep>, f64)> {
    let mut steps = Vec::new();
    let mut rates = sizes.rates.clone();
    let mut idle_rss = f64::NAN;
    let mut index = 0;
    while index < rates.len() {
        let rate = rates[index];
        index += 1;
        let spec = Spec {
            name: format!("rate{rate}"),
            backend: Backend::PostgresRedis,
            executor: "kubernetes",
            roles: "api,launcher,watcher",
        };
        let dispatcher = Dispatcher::start(env, &spec).await?;
        let seen = Seen::watch(&env.client, &dispatcher.namespace).await;
        if steps.is_empty() {
            // Idle: started, connected, nothing submitted yet.
            tokio::time::sleep(Duration::from_secs(2)).await;
            idle_rss = dispatcher.rss_mib()?;
        }
        let before = stages::histograms(&dispatcher.scrape().await?);
        let outcome = dispatcher
            .target
            .open_loop(rate, sizes.step, sizes.request_timeout)
            .await;
        let all_seen = seen.wait_for(outcome.accepted.len(), sizes.drain).await;
        let after = stages::histograms(&dispatcher.scrape().await?);
        let recorded = stages::recorded(&dispatcher.database_url).await?;
        dispatcher.stop(env).await;

        let breakdown = Breakdown::of(&outcome.accepted, &recorded, &seen);
        let seen_times: Vec<f64> = outcome
            .accepted
            .iter()
            .filter_map(|a| seen.at(&a.id))
            .collect();
        // The pace Jobs appeared at, first to last: the offered rate while the
        // dispatcher keeps up, less once it falls behind (latency alone does not lower
        // it).
        let first = seen_times.iter().copied().fold(f64::INFINITY, f64::min);
        let last = seen_times.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let achieved =
            seen_times.len().saturating_sub(1) as f64 / ((last - first) / 1000.0).max(1e-3);
        let saturated =
            !all_seen || outcome.answered_fraction() < 0.99 || achieved < 0.9 * f64::from(rate);
        let step = RateStep {
            rate,
            seen: seen_times.len(),
            achieved,
            breakdown,
            means: stages::operation_means(&before, &after),
            saturated,
            outcome,
        };
        let (p50, p99) = step.job_seen();
        eprintln!(
            "bench: (a) {rate}/s: {}/{} accepted, {} Jobs seen at {achieved:.0}/s, submit→Job p50 {p50:.0} ms p99 {p99:.0} ms{}",
            step.outcome.accepted.len(),
            step.outcome.sent,
            step.seen,
            if saturated { ", saturated" } else { "" }
        );
        steps.push(step);
        // The listed rates all run (the goals name 20/s); past them, doubling goes on
        // until a rate saturates.
        if index == rates.len() && !saturated && rate * 2 <= sizes.max_rate {
            rates.push(rate * 2);
        }
    }
    Ok((steps, idle_rss))
}

/// Throughput of one run: tasks, and tasks a second from the first send to the last Job
/// seen.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Throughput {
    pub(crate) tasks: usize,
    pub(crate) per_second: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

fn throughput(sent: &[(String, f64)], seen: &Seen) -> Throughput {
    let first = sent.iter().map(|(_, at)| *at).fold(f64::INFINITY, f64::min);
    let latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| seen.at(id).map(|s| s - at))
        .collect();
    let last = sent
        .iter()
        .filter_map(|(id, _)| seen.at(id))
        .fold(f64::NEG_INFINITY, f64::max);
    Throughput {
        tasks: latencies.len(),
        per_second: latencies.len() as f64 / ((last - first) / 1000.0).max(1e-3),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
    }
}

/// kube-rs direct: `Api::<Job>::create` of the same Jobs, `concurrency` at once.
async fn direct(env: &Env, sizes: &Sizes, round: usize) -> anyhow::Result<Throughput> {
    let namespace = format!("bench-direct-{}-{round}", env.suffix);
    create_namespace(&env.client, &namespace).await?;
    let seen = Seen::watch(&env.client, &namespace).await;
    let config = LaunchConfig {
        namespace: namespace.clone(),
        ..LaunchConfig::default()
    };
    let spec = bench_spec()?;
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), &namespace);
    let sent = Arc::new(Mutex::new(Vec::new()));
    futures::stream::iter(0..sizes.ratio_tasks)
        .for_each_concurrent(sizes.concurrency, |_| {
            let (jobs, config, sent, spec) =
                (jobs.clone(), config.clone(), sent.clone(), spec.clone());
            async move {
                let task = Task::new("bench", spec);
                let Ok(job) = build_job(&task, &config, None) else {
                    return;
                };
                let at = now_ms();
                match jobs.create(&PostParams::default(), &job).await {
                    Ok(_) => {
                        if let Ok(mut sent) = sent.lock() {
                            sent.push((task.id.to_string(), at));
                        }
                    }
                    Err(error) => eprintln!("bench: direct create failed: {error}"),
                }
            }
        })
        .await;
    let sent = sent.lock().map(|s| s.clone()).unwrap_or_default();
    seen.wait_for(sent.len(), sizes.drain).await;
    delete_namespace(&env.client, &namespace).await;
    Ok(throughput(&sent, &seen))
}

/// agent-bus: the same number of `POST /v1/tasks`, `concurrency` at once.
async fn through_dispatcher(env: &Env, sizes: &Sizes, round: usize) -> anyhow::Result<Throughput> {
    let spec = Spec {
        name: format!("ratio{round}"),
        backend: Backend::PostgresRedis,
        executor: "kubernetes",
        roles: "api,launcher,watcher",
    };
    let dispatcher = Dispatcher::start(env, &spec).await?;
    let seen = Seen::watch(&env.client, &dispatcher.namespace).await;
    let outcome = dispatcher
        .target
        .closed_loop(sizes.ratio_tasks, sizes.concurrency, sizes.request_timeout)
        .await;
    seen.wait_for(outcome.accepted.len(), sizes.drain).await;
    dispatcher.stop(env).await;
    let sent: Vec<(String, f64)> = outcome
        .accepted
        .iter()
        .map(|a| (a.id.clone(), a.sent_ms))
        .collect();
    Ok(throughput(&sent, &seen))
}

/// (b): `sizes.rounds` rounds of direct then agent-bus; the ratio of each round and
/// their median.
#[derive(Debug)]
pub(crate) struct Ratio {
    pub(crate) rounds: Vec<(Throughput, Throughput)>,
    pub(crate) median: f64,
}

pub(crate) async fn ratio_against_direct(env: &Env, sizes: &Sizes) -> anyhow::Result<Ratio> {
    let mut rounds = Vec::new();
    for round in 1..=sizes.rounds {
        let baseline = direct(env, sizes, round).await?;
        let ours = through_dispatcher(env, sizes, round).await?;
        eprintln!(
            "bench: (b) round {round}: direct {:.0}/s, agent-bus {:.0}/s",
            baseline.per_second, ours.per_second
        );
        rounds.push((baseline, ours));
    }
    let ratios: Vec<f64> = rounds
        .iter()
        .map(|(d, o)| o.per_second / d.per_second)
        .collect();
    Ok(Ratio {
        median: median(&ratios),
        rounds,
    })
}
