//! The `dispatcher` binary: parses the configuration and wires the roles together.
//! Everything it starts lives in the library; this file only connects the pieces.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use dispatcher::api::{self, AppState};
use dispatcher::config::{
    BudgetArgs, Cli, Command, ExecutorChoice, LogArgs, LogFormat, Role, ServeArgs, TenantCommand,
};
use dispatcher::cost::Prices;
use dispatcher::launcher::job_spec::{LaunchConfig, RunnerInjection};
use dispatcher::launcher::{Canceller, Executor, KubernetesExecutor, Launcher, LocalExecutor};
use dispatcher::metrics::Metrics;
use dispatcher::metrics::kubernetes::KubernetesMetricsLayer;
use dispatcher::metrics::snapshot::SnapshotConfig;
use dispatcher::placement::PlacementCatalog;
use dispatcher::queue::{MemoryQueue, Queue, RedisQueue};
use dispatcher::report::{ReportEndpoint, ReportIssuer, ReportTokens};
use dispatcher::lifecycle::Lifecycle;
use dispatcher::store::{Budget, BudgetAction, Store};
use dispatcher::task::submission::{Limits, ShmRule, is_dns_label};
use dispatcher::task::Memory;
use dispatcher::watcher::{Watcher, lease::LeaseConfig};
use tokio::sync::watch;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dispatcher: starting the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Command::Healthcheck(args) = &cli.command {
        return runtime.block_on(dispatcher::healthcheck::run(args));
    }
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "dispatcher failed");
            eprintln!("dispatcher: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::Healthcheck(_) => Ok(()), // answered in `main`, before logging matters
        Command::Migrate(database) => {
            let store =
                Store::connect(&database.database_url, database.database_max_connections).await?;
            store.migrate().await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Tenant(TenantCommand::Create {
            name,
            max_queued_tasks,
            budget,
            database,
        }) => {
            if !is_dns_label(&name) {
                bail!(
                    "tenant name '{name}' must be an RFC 1123 label: 1 to 63 lowercase letters, digits or '-'"
                );
            }
            let budget = budget_of(&budget)?;
            let store =
                Store::connect(&database.database_url, database.database_max_connections).await?;
            store.migrate().await?;
            let key = api::new_api_key();
            store
                .create_tenant(&name, &api::hash_api_key(&key), max_queued_tasks)
                .await?;
            if budget.is_set() {
                store.set_budget(&name, &budget).await?;
            }
            tracing::info!(tenant = %name, "tenant created");
            println!("{key}");
            Ok(())
        }
        Command::Tenant(TenantCommand::Budget {
            name,
            budget,
            database,
        }) => {
            let budget = budget_of(&budget)?;
            let store =
                Store::connect(&database.database_url, database.database_max_connections).await?;
            store.migrate().await?;
            store.set_budget(&name, &budget).await?;
            tracing::info!(tenant = %name, ?budget, "budget set");
            Ok(())
        }
    }
}

/// The budget the flags describe; a negative or non-finite amount names its flag.
fn budget_of(args: &BudgetArgs) -> anyhow::Result<Budget> {
    for (flag, amount) in [
        ("--daily-budget", args.daily_budget),
        ("--monthly-budget", args.monthly_budget),
    ] {
        if let Some(amount) = amount {
            anyhow::ensure!(
                amount.is_finite() && amount >= 0.0,
                "{flag} {amount}: a budget is a number of dollars, at least 0"
            );
        }
    }
    let action = args
        .budget_action
        .parse::<BudgetAction>()
        .map_err(|e| anyhow::anyhow!("--budget-action: {e}"))?;
    Ok(Budget {
        daily_dollars: args.daily_budget,
        monthly_dollars: args.monthly_budget,
        action,
    })
}

/// Which executor `auto` picks, and the words for the first log line.
fn choose_executor(args: &ServeArgs) -> (ExecutorChoice, String) {
    match args.executor {
        ExecutorChoice::Kubernetes => (
            ExecutorChoice::Kubernetes,
            "--executor kubernetes".to_owned(),
        ),
        ExecutorChoice::Local => (ExecutorChoice::Local, "--executor local".to_owned()),
        ExecutorChoice::Auto => {
            if let Some(path) = args.kubeconfig.as_ref().filter(|p| p.exists()) {
                (
                    ExecutorChoice::Kubernetes,
                    format!("auto: kubeconfig {} exists", path.display()),
                )
            } else if args.in_cluster_token.exists() {
                (
                    ExecutorChoice::Kubernetes,
                    format!(
                        "auto: in-cluster service account ({})",
                        args.in_cluster_token.display()
                    ),
                )
            } else {
                (ExecutorChoice::Local, "auto: no kubeconfig (--kubeconfig/KUBECONFIG) and no in-cluster service account".to_owned())
            }
        }
    }
}

async fn kube_client(
    kubeconfig: Option<&PathBuf>,
    metrics: &Metrics,
) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig.filter(|p| p.exists()) {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?
        }
        None => kube::Config::incluster().context("in-cluster kubernetes configuration")?,
    };
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&KubernetesMetricsLayer::new(metrics.clone()))
        .build())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (executor_choice, why) = choose_executor(&args);
    let executor_name = if executor_choice == ExecutorChoice::Kubernetes {
        "kubernetes"
    } else {
        "local"
    };
    tracing::info!(executor = executor_name, why = %why, roles = ?args.roles, "dispatcher starting");

    let store = Store::connect(
        &args.database.database_url,
        args.database.database_max_connections,
    )
    .await
    .with_context(|| {
        format!(
            "connecting to the database {}",
            redact(&args.database.database_url)
        )
    })?;
    store.migrate().await.context("applying migrations")?;
    let instance = args.instance.clone().unwrap_or_else(|| {
        format!(
            "dispatcher-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    });
    let queue = if let Some(url) = &args.redis_url {
        Queue::from(
            RedisQueue::connect(url, &args.redis_prefix, "launchers")
                .await
                .with_context(|| format!("connecting to redis {}", redact(url)))?,
        )
    } else {
        if args.roles.len() < 3 {
            tracing::warn!(
                "the in-process queue only works when api and launcher run in the same process"
            );
        }
        Queue::from(MemoryQueue::new())
    };

    let catalog = match &args.placement.placement_file {
        Some(path) => PlacementCatalog::load(path)?,
        None => PlacementCatalog::default(),
    };
    let prices = Prices::new(
        &catalog.gpu_classes,
        args.cost.price_cpu_core_hour,
        args.cost.price_memory_gib_hour,
    )?;
    anyhow::ensure!(
        args.cost.cost_rate_alert_dollars_per_hour.is_finite()
            && args.cost.cost_rate_alert_dollars_per_hour >= 0.0,
        "--cost-rate-alert-dollars-per-hour must be a number of dollars, at least 0 (0 disables the alert)"
    );
    let metrics = Metrics::new(executor_name);
    let store = store.observed_by(Arc::new(metrics.clone()));
    let lifecycle = Lifecycle::new(store.clone(), metrics.clone(), prices);
    let queue = queue.observed(metrics.clone());
    let quantity = |flag: &str, text: &str| {
        text.parse::<Memory>()
            .map_err(|e| anyhow::anyhow!("--{flag} {text}: {e}"))
    };
    let limits = Arc::new(Limits {
        gpu_classes: catalog.gpu_classes.capacities(),
        allowed_annotation_prefixes: args.allow_annotation_prefix.clone(),
        volume_claims: catalog.volume_claims.clone(),
        shm_rule: ShmRule {
            fraction: args.placement.shm_fraction,
            cap: quantity("shm-cap", &args.placement.shm_cap)?,
            without_memory_request: quantity(
                "shm-without-memory",
                &args.placement.shm_without_memory,
            )?,
        },
        ..Limits::default()
    });
    let launch = Arc::new(LaunchConfig {
        namespace: args.namespace.clone(),
        gpu_classes: catalog.gpu_classes.clone(),
        ttl_seconds_after_finished: args.job_ttl_seconds,
        run_as_user: args.run_as_user,
        kueue_queue_name: args.kueue_queue_name.clone(),
        runner: RunnerInjection {
            image: args.runner.runner_image.clone(),
            image_pull_policy: args.runner.runner_image_pull_policy.clone(),
            heartbeat_seconds: args.runner.heartbeat_seconds,
        },
        scratch_storage_class: args.placement.scratch_storage_class.clone(),
    });

    let report_tokens = report_tokens(&store, args.runner.report_secret.as_deref()).await?;
    let report_base = match &args.runner.report_url {
        Some(url) => Some(url.clone()),
        None if executor_choice == ExecutorChoice::Local => Some(format!("http://{}", args.listen)),
        None => {
            tracing::warn!(
                "no --report-url: task runners will run commands but report nothing (no heartbeats, usage or GPU figures)"
            );
            None
        }
    };
    let kubernetes_reports = report_base.is_some();
    let report_issuer = report_base.map(|base| ReportIssuer {
        endpoint: ReportEndpoint::new(&base),
        tokens: report_tokens.clone(),
    });

    let (executor, canceller, cluster) = if executor_choice == ExecutorChoice::Kubernetes {
        let client = kube_client(args.kubeconfig.as_ref(), &metrics).await?;
        let kubernetes =
            KubernetesExecutor::new(client.clone(), launch.clone(), report_issuer.clone());
        (
            Executor::Kubernetes(kubernetes.clone()),
            Canceller::Kubernetes(kubernetes),
            Some(client),
        )
    } else {
        let runner = find_runner(args.runner.runner_path.as_deref())?;
        tracing::info!(runner = %runner.display(), "local tasks run through this runner");
        let local = LocalExecutor::new(lifecycle.clone(), args.local_workdir.clone())
            .with_runner(runner, report_issuer.clone());
        if args.roles.contains(&Role::Launcher) {
            lifecycle.fail_orphaned_local_tasks().await;
        }
        (
            Executor::Local(local.clone()),
            Canceller::Local(local),
            None,
        )
    };

    let (shutdown_sender, shutdown) = watch::channel(false);
    let mut roles = tokio::task::JoinSet::new();

    if args.roles.contains(&Role::Launcher) {
        let launcher = Launcher {
            lifecycle: lifecycle.clone(),
            queue: queue.clone(),
            executor: executor.clone(),
            consumer: instance.clone(),
            concurrency: args.launch_concurrency,
            reconcile_interval: args.reconcile_interval,
            stale_after: args.launching_stale_after,
        };
        roles.spawn(launcher.run(shutdown.clone()));
    }
    if args.roles.contains(&Role::Watcher) {
        if let (Executor::Kubernetes(kubernetes), Some(client)) = (&executor, &cluster) {
            {
                let watcher = Watcher {
                    lifecycle: lifecycle.clone(),
                    client: client.clone(),
                    namespace: args.namespace.clone(),
                    executor: kubernetes.clone(),
                    queue: queue.clone(),
                    gpu_classes: catalog.gpu_classes.clone(),
                    unschedulable_after: args.unschedulable_after,
                    fallback_after: args.placement.fallback_after,
                    heartbeat_timeout: kubernetes_reports.then_some(args.runner.heartbeat_timeout),
                    fail_on_heartbeat_lost: args.runner.fail_on_heartbeat_lost,
                    sweep_interval: args.reconcile_interval,
                    lease: LeaseConfig {
                        name: args.lease_name.clone(),
                        namespace: args
                            .lease_namespace
                            .clone()
                            .unwrap_or_else(|| args.namespace.clone()),
                        identity: instance.clone(),
                        duration: Duration::from_secs(15),
                        renew_every: Duration::from_secs(5),
                    },
                };
                roles.spawn(watcher.run(shutdown.clone()));
            }
        } else {
            tracing::info!("watcher role idle: the local executor records outcomes itself");
        }
    }

    let shutdown_sender = Arc::new(shutdown_sender);
    let signal_sender = shutdown_sender.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = signal_sender.send(true);
    });

    // Every role answers /healthz and /readyz (its Kubernetes probes); only the api role
    // serves the REST API.
    let state = AppState {
        lifecycle: lifecycle.clone(),
        queue: queue.clone(),
        limits,
        launch,
        canceller,
        cluster,
        max_body_bytes: args.max_body_bytes,
        follow_poll: Duration::from_millis(250),
        report_tokens,
        snapshot: Arc::new(SnapshotConfig {
            max_age: args.cost.metrics_snapshot_max_age,
            queued_too_long: args.cost.queued_too_long_after,
            launching_stale: (args.launching_stale_after * 4).max(Duration::from_mins(1)),
            cost_rate_alert_dollars_per_hour: args.cost.cost_rate_alert_dollars_per_hour,
        }),
    };
    let router = if args.roles.contains(&Role::Api) {
        api::router(state)
    } else {
        dispatcher::healthcheck::probe_router(state)
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, roles = ?args.roles, "api listening");
    let mut api_shutdown = shutdown.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = api_shutdown.wait_for(|stop| *stop).await;
        })
        .await
        .context("serving the api")?;
    let _ = shutdown_sender.send(true);
    while roles.join_next().await.is_some() {}
    tracing::info!("dispatcher stopped");
    Ok(())
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut terminate) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = interrupt.await;
}

/// The report-token signer: the configured secret, or the one every replica shares
/// through the database (generated by whichever started first).
async fn report_tokens(store: &Store, secret: Option<&str>) -> anyhow::Result<ReportTokens> {
    if let Some(secret) = secret {
        anyhow::ensure!(
            secret.len() >= 32,
            "--report-secret must be at least 32 characters"
        );
        return Ok(ReportTokens::new(secret.as_bytes()));
    }
    let generated = store
        .setting_or_create("report_token_key", || {
            hex::encode(rand::random::<[u8; 32]>())
        })
        .await
        .context("reading the report-token key")?;
    Ok(ReportTokens::new(generated.as_bytes()))
}

/// The runner the local executor uses: the configured path, else `runner` beside this
/// executable, else on PATH.
fn find_runner(configured: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = configured {
        anyhow::ensure!(
            path.is_file(),
            "--runner-path {}: no such file",
            path.display()
        );
        return Ok(path.to_owned());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("runner")))
        .filter(|path| path.is_file());
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("runner"))
                .find(|path| path.is_file())
        })
    };
    beside.or_else(on_path).ok_or_else(|| {
        anyhow::anyhow!(
            "the local executor runs every task through the runner, and none was found next to the dispatcher or on PATH: build it (cargo build --release -p runner) or pass --runner-path"
        )
    })
}

/// A URL without its password, for logs and errors.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
