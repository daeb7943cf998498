//! `bench` (package `agent-bus-bench`, run by `tests/bench`): how fast agent-bus turns
//! HTTP submissions into Kubernetes Jobs, against a baseline measured in the same run
//! that creates the same Jobs directly with kube-rs at the same concurrency. Runs against the test environment (`eval "$(tests/env/up)"`):
//! it needs `KUBECONFIG`, `DATABASE_URL` and `REDIS_URL`, starts its own dispatcher
//! process, and cleans up what it created.
//!
//! Latency of one task: from just before its request (POST, or the baseline's create
//! call) to the moment a watch on the namespace sees its Job. Throughput: tasks divided
//! by the time from the first request to the last Job seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use dispatcher::launcher::job_spec::{LABEL_TASK_ID, LaunchConfig, build_job};
use dispatcher::store::Store;
use dispatcher::task::submission::{Limits, Submission, validate};
use dispatcher::task::{Task, TaskSpec};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use sqlx::Connection as _;

/// Measures submit-to-Job throughput and latency of agent-bus against direct kube-rs creates.
#[derive(Debug, Parser)]
struct Args {
    /// Tasks per run.
    #[arg(long, default_value_t = 300)]
    tasks: usize,
    /// Requests in flight at once, for both the dispatcher and the baseline.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
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

/// The task both runs launch: small, CPU only.
fn bench_spec() -> anyhow::Result<TaskSpec> {
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

/// Runs one statement on the server of `url` (creating and dropping the bench database).
async fn admin_statement(url: &str, sql: String) -> anyhow::Result<()> {
    let mut connection = sqlx::PgConnection::connect(url).await?;
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut connection)
        .await?;
    connection.close().await?;
    Ok(())
}

struct Run {
    label: String,
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(index).copied().unwrap_or_default()
    }
}

/// Records when a watch first sees each Job, by task id label.
fn watch_jobs(client: Client, namespace: &str) -> Arc<Mutex<HashMap<String, Instant>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let jobs: Api<Job> = Api::namespaced(client, namespace);
    let record = seen.clone();
    tokio::spawn(async move {
        let stream = watcher(jobs, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        let _ = stream
            .try_for_each(|job| {
                let id = job
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_TASK_ID))
                    .cloned();
                if let (Some(id), Ok(mut seen)) = (id, record.lock()) {
                    seen.entry(id).or_insert_with(Instant::now);
                }
                futures::future::ready(Ok(()))
            })
            .await;
    });
    seen
}

async fn wait_for_all(
    seen: &Arc<Mutex<HashMap<String, Instant>>>,
    count: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_mins(10);
    loop {
        let have = seen.lock().map(|s| s.len()).unwrap_or_default();
        if have >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {have} of {count} jobs appeared within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn summarise(
    label: &str,
    started: &HashMap<String, Instant>,
    seen: &HashMap<String, Instant>,
) -> Run {
    let first = started.values().min().copied().unwrap_or_else(Instant::now);
    let last = started
        .keys()
        .filter_map(|id| seen.get(id))
        .max()
        .copied()
        .unwrap_or(first);
    let latencies = started
        .iter()
        .filter_map(|(id, at)| seen.get(id).map(|s| s.saturating_duration_since(*at)))
        .collect();
    Run {
        label: label.to_owned(),
        seconds: last.duration_since(first).as_secs_f64().max(1e-9),
        latencies,
    }
}

async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok(())
}

async fn baseline(client: &Client, args: &Args, suffix: &str, round: u32) -> anyhow::Result<Run> {
    let namespace = format!("bench-direct-{suffix}-{round}");
    create_namespace(client, &namespace).await?;
    let seen = watch_jobs(client.clone(), &namespace);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let config = LaunchConfig {
        namespace: namespace.clone(),
        ..LaunchConfig::default()
    };
    let spec = bench_spec()?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let started = Arc::new(Mutex::new(HashMap::new()));
    futures::stream::iter(0..args.tasks)
        .for_each_concurrent(args.concurrency, |_| {
            let (jobs, config, started, spec) =
                (jobs.clone(), config.clone(), started.clone(), spec.clone());
            async move {
                let task = Task::new("bench", spec);
                let Ok(job) = build_job(&task, &config, None) else {
                    return;
                };
                if let Ok(mut started) = started.lock() {
                    started.insert(task.id.simple(), Instant::now());
                }
                if let Err(error) = jobs.create(&PostParams::default(), &job).await {
                    eprintln!("baseline create failed: {error}");
                }
            }
        })
        .await;
    wait_for_all(&seen, args.tasks).await?;
    let started = started.lock().map(|s| s.clone()).unwrap_or_default();
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&namespace, &DeleteParams::background())
        .await;
    Ok(summarise(
        &format!("kube-rs direct (round {round})"),
        &started,
        &seen,
    ))
}

async fn through_dispatcher(client: &Client, args: &Args, suffix: &str) -> anyhow::Result<Run> {
    let namespace = format!("bench-dispatcher-{suffix}");
    create_namespace(client, &namespace).await?;
    let database = format!("bench_{suffix}");
    // The name is ours: a fixed prefix and hex.
    admin_statement(
        &args.database_url,
        format!("CREATE DATABASE \"{database}\""),
    )
    .await?;
    let database_url = replace_database(&args.database_url, &database);
    let store = Store::connect(&database_url, 4).await?;
    store.migrate().await?;
    let key = dispatcher::api::new_api_key();
    let key = dispatcher::api::ExposeSecret::expose_secret(&key).to_owned();
    store
        .create_tenant("bench", &dispatcher::api::hash_api_key(&key), 1_000_000)
        .await?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = tokio::process::Command::new(&args.dispatcher)
        .args([
            "serve",
            "--executor",
            "kubernetes",
            "--listen",
            &format!("127.0.0.1:{port}"),
            // A free port: a bench beside other dispatchers must not collide on the default.
            "--metrics-listen",
            "127.0.0.1:0",
            "--namespace",
            &namespace,
        ])
        .args([
            "--kubeconfig",
            &args.kubeconfig.display().to_string(),
            "--redis-url",
            &args.redis_url,
        ])
        .args([
            "--redis-prefix",
            &format!("bench:{suffix}:"),
            "--database-url",
            &database_url,
            "--log-filter",
            "warn",
        ])
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", args.dispatcher.display()))?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let ready_deadline = Instant::now() + Duration::from_mins(1);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > ready_deadline {
            bail!("the dispatcher did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = watch_jobs(client.clone(), &namespace);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = serde_json::json!({"name": "bench", "image": "registry.invalid/bench:1", "command": ["true"], "resources": {"cpu": "100m", "memory": "64Mi"}});
    let started = Arc::new(Mutex::new(HashMap::new()));
    futures::stream::iter(0..args.tasks)
        .for_each_concurrent(args.concurrency, |_| {
            let (http, base, key, body, started) = (
                http.clone(),
                base.clone(),
                key.clone(),
                body.clone(),
                started.clone(),
            );
            async move {
                let at = Instant::now();
                match http
                    .post(format!("{base}/v1/tasks"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(response) => match response.json::<serde_json::Value>().await {
                        Ok(task) => {
                            let id = task["id"].as_str().unwrap_or_default().replace('-', "");
                            if let Ok(mut started) = started.lock() {
                                started.insert(id, at);
                            }
                        }
                        Err(error) => eprintln!("submit answer unreadable: {error}"),
                    },
                    Err(error) => eprintln!("submit failed: {error}"),
                }
            }
        })
        .await;
    wait_for_all(&seen, args.tasks).await?;
    let started = started.lock().map(|s| s.clone()).unwrap_or_default();
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&namespace, &DeleteParams::background())
        .await;
    store.close().await;
    let _ = admin_statement(
        &args.database_url,
        format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"),
    )
    .await;
    Ok(summarise("agent-bus over HTTP", &started, &seen))
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = Client::try_from(config)?;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    eprintln!(
        "bench: {} tasks, concurrency {}",
        args.tasks, args.concurrency
    );
    let first = baseline(&client, &args, &suffix, 1).await?;
    let ours = through_dispatcher(&client, &args, &suffix).await?;
    let second = baseline(&client, &args, &suffix, 2).await?;
    let baseline_rate = f64::midpoint(first.rate(), second.rate());
    println!("| run | tasks | tasks/s | p50 submit→Job | p99 submit→Job |");
    println!("| --- | --- | --- | --- | --- |");
    for run in [&first, &ours, &second] {
        println!(
            "| {} | {} | {:.1} | {:.1} ms | {:.1} ms |",
            run.label,
            run.latencies.len(),
            run.rate(),
            run.percentile(0.5).as_secs_f64() * 1000.0,
            run.percentile(0.99).as_secs_f64() * 1000.0
        );
    }
    println!();
    println!(
        "ratio agent-bus / kube-rs direct (mean of both rounds): {:.2}",
        ours.rate() / baseline_rate
    );
    Ok(())
}
