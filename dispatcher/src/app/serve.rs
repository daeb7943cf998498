//! `dispatcher serve`: connects the store and the queue, picks the executor, starts the
//! launcher and watcher roles this process runs and the webhook deliverer every process
//! runs, serves the API (or only the probes),
//! and stops everything on SIGTERM or Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::watch;

use super::executor::{
    check_task_users, choose_executor, find_runner, kube_client, local_task_users, local_workdir,
};
use super::{LOG_TARGET, healthcheck, open_store, redact_url, settings};
use crate::api::admission::Admission;
use crate::api::event_feed::EventFeed;
use crate::api::readiness::Readiness;
use crate::api::streams::OpenStreams;
use crate::api::{self, AppState};
use crate::config::{self, ExecutorChoice, Role, ServeArgs};
use crate::cost::Prices;
use crate::k8s::rate_limit::RateLimitLayer;
use crate::launcher::{
    Canceller, Executor, KubernetesExecutor, Launcher, LocalExecutor, QuotaWaits, StubExecutor,
    isolation,
};
use crate::lifecycle::{Lifecycle, RetrySettings};
use crate::metrics::Metrics;
use crate::placement::PlacementCatalog;
use crate::queue::{MemoryQueue, Queue, RedisQueue};
use crate::report::retention::{Sweep, run_retention};
use crate::report::{ReportEndpoint, ReportIssuer, ReportTokens};
use crate::secrets::{KubernetesSecrets, LocalSecrets, SecretStore};
use crate::store::Store;
use crate::watcher::Watcher;
use crate::webhooks::Deliverer;

/// How often each process looks for queued tasks past their queue TTL: a task expires
/// within this of its deadline.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often followed streams read the store: the event feed's tick, and a followed
/// stream's output and progress reads.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

pub(super) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Everything this process creates (the SQLite file and its journals, the local work
    // folders, secrets) is its own alone unless it says otherwise; local tasks inherit
    // the mask, so their files are their user's alone too.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let (executor_choice, why) = choose_executor(
        args.executor,
        args.kubeconfig.as_deref(),
        &args.in_cluster_token,
    );
    let executor_name = match executor_choice {
        ExecutorChoice::Kubernetes => "kubernetes",
        ExecutorChoice::Stub => "stub",
        ExecutorChoice::Local | ExecutorChoice::Auto => "local",
    };
    tracing::info!(target: LOG_TARGET, executor = executor_name, why = %why, roles = ?args.roles, "dispatcher starting");
    settings::check(&args).map_err(anyhow::Error::msg)?;
    let instance = settings::instance(&args);
    let lease = settings::lease(&args, &instance)?;

    let store = open_store(&args.database).await?;
    warn_of_durability_risks(&store).await;
    let queue = connect_queue(&args).await?;

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
    let launch = Arc::new(settings::launch_config(&args, &catalog));
    // Webhook deliveries carry the task as the API shows it.
    let renderer = api::task_renderer(
        prices.clone(),
        (executor_choice == ExecutorChoice::Kubernetes).then(|| launch.namespace.clone()),
    );
    let lifecycle = Lifecycle::new(store.clone(), metrics.clone(), prices)
        .with_retries(RetrySettings {
            defaults: settings::retry_defaults(&args),
            gpu_classes: catalog.gpu_classes.clone(),
        })
        .with_task_renderer(renderer);
    let queue = queue.observed(metrics.clone());
    let limits = Arc::new(settings::limits(&args, &catalog));

    let report_tokens = report_tokens(&store, args.runner.report_secret.as_ref()).await?;
    let report_base = match &args.runner.report_url {
        Some(url) => Some(url.clone()),
        None if executor_choice == ExecutorChoice::Local => Some(format!("http://{}", args.listen)),
        // Nothing runs under the stub executor, so nothing reports.
        None if executor_choice == ExecutorChoice::Stub => None,
        None => {
            tracing::warn!(
                target: LOG_TARGET,
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

    // The tenants' secrets live where the executor hands them to tasks: Secrets in the
    // tasks namespace (a `secretKeyRef` in the Job), or owner-only files beside the
    // local executor.
    let (executor, canceller, cluster, secrets) = if executor_choice == ExecutorChoice::Kubernetes {
        let rate = RateLimitLayer::new(args.kube_api_qps, args.kube_api_burst);
        let client = kube_client(args.kubeconfig.as_ref(), &rate, &metrics).await?;
        let kubernetes =
            KubernetesExecutor::new(client.clone(), launch.clone(), report_issuer.clone());
        let secrets =
            SecretStore::Kubernetes(KubernetesSecrets::new(client.clone(), &launch.namespace));
        (
            Executor::Kubernetes(kubernetes.clone()),
            Canceller::Kubernetes(kubernetes),
            Some(client),
            secrets,
        )
    } else if executor_choice == ExecutorChoice::Stub {
        // Benchmarks only: no cluster and no runner; secrets kept as the local executor
        // keeps them, so the API behaves as it does in production.
        tracing::warn!(target: LOG_TARGET, "--executor stub: tasks are marked launched and never run (benchmarks only)");
        let secrets = LocalSecrets::open(args.local_secrets_dir.clone()).with_context(|| {
            format!(
                "opening the local secret store {}",
                args.local_secrets_dir.display()
            )
        })?;
        (
            Executor::Stub(StubExecutor),
            Canceller::Stub(StubExecutor),
            None,
            SecretStore::Local(secrets),
        )
    } else {
        let secrets = LocalSecrets::open(args.local_secrets_dir.clone()).with_context(|| {
            format!(
                "opening the local secret store {}",
                args.local_secrets_dir.display()
            )
        })?;
        let runner = find_runner(
            args.runner.runner_path.as_deref(),
            std::env::current_exe().ok().as_deref(),
            config::program_search_path().as_deref(),
        )?;
        tracing::info!(target: LOG_TARGET, runner = %runner.display(), "local tasks run through this runner");
        let users = local_task_users(&args, &store).await?;
        let workdir =
            isolation::prepare_root(&local_workdir(args.local_workdir.as_deref(), users), users)?;
        let runner = isolation::install_runner(&workdir, &runner, users)?;
        check_task_users(&runner, &workdir, users).await?;
        tracing::info!(target: LOG_TARGET, workdir = %workdir.display(), users = ?users, "local tasks run in this folder");
        let local = LocalExecutor::new(lifecycle.clone(), workdir)
            .with_runner(runner, report_issuer.clone())
            .with_users(users)
            .with_secrets(secrets.clone());
        if args.roles.contains(&Role::Launcher) {
            lifecycle.end_orphaned_local_attempts().await;
        }
        (
            Executor::Local(local.clone()),
            Canceller::Local(local),
            None,
            SecretStore::Local(secrets),
        )
    };

    let (shutdown_sender, shutdown) = watch::channel(false);
    let mut roles = tokio::task::JoinSet::new();
    // Every role expires queued tasks past their queue TTL, so they expire even where no
    // launcher runs.
    roles.spawn(
        lifecycle
            .clone()
            .run_expiry(EXPIRY_INTERVAL, shutdown.clone()),
    );

    // Every role delivers webhooks: the outbox is in the store, and leases keep one
    // sender per delivery whatever the number of processes.
    let deliverer = Deliverer::new(
        store.clone(),
        metrics.clone(),
        settings::delivery_settings(&args)?,
    )?;
    roles.spawn(deliverer.run(shutdown.clone()));
    // Every role purges task output past --log-retention and ended tasks past
    // --task-retention (a repeated delete is harmless).
    roles.spawn(run_retention(
        Sweep::Logs,
        store.clone(),
        metrics.clone(),
        Some(args.runner.log_retention),
        shutdown.clone(),
    ));
    roles.spawn(run_retention(
        Sweep::Tasks,
        store.clone(),
        metrics.clone(),
        // 0 keeps tasks forever.
        (!args.runner.task_retention.is_zero()).then_some(args.runner.task_retention),
        shutdown.clone(),
    ));

    if args.roles.contains(&Role::Launcher) {
        let launcher = Launcher {
            lifecycle: lifecycle.clone(),
            queue: queue.clone(),
            executor: executor.clone(),
            consumer: instance.clone(),
            concurrency: args.launch_concurrency,
            reconcile_interval: args.reconcile_interval,
            stale_after: args.launching_stale_after,
            quota_waits: QuotaWaits::new(args.launching_stale_after, args.cluster_quota_retry_max),
        };
        roles.spawn(launcher.run(shutdown.clone()));
    }
    if args.roles.contains(&Role::Watcher) {
        if let (Executor::Kubernetes(kubernetes), Some(client)) = (&executor, &cluster) {
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
                keep_finished_jobs: args.keep_finished_jobs,
                lease,
            };
            roles.spawn(watcher.run(shutdown.clone()));
        } else if executor_choice == ExecutorChoice::Stub {
            tracing::info!(target: LOG_TARGET, "watcher role idle: the stub executor runs nothing to watch");
        } else {
            tracing::info!(target: LOG_TARGET, "watcher role idle: the local executor records outcomes itself");
        }
    }

    let shutdown_sender = Arc::new(shutdown_sender);
    let signal_sender = shutdown_sender.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(target: LOG_TARGET, "shutting down");
        let _ = signal_sender.send(true);
    });

    // Every role answers /healthz and /readyz (its Kubernetes probes) on --listen; only
    // the api role serves the REST API there. /metrics is only on --metrics-listen.
    let state = AppState {
        lifecycle: lifecycle.clone(),
        queue: queue.clone(),
        limits,
        launch,
        canceller,
        cluster,
        secrets,
        max_body_bytes: args.max_body_bytes,
        follow_poll: FOLLOW_POLL,
        event_feed: EventFeed::new(lifecycle.store().clone(), FOLLOW_POLL),
        list_page_max_bytes: api::task_list::DEFAULT_PAGE_MAX_BYTES,
        report_tokens,
        snapshot: Arc::new(settings::snapshot_config(&args)),
        reports: settings::report_limits(&args),
        readiness: Arc::new(Readiness::default()),
        admission: Admission::new(args.max_in_flight_requests),
        streams: Arc::new(OpenStreams::new(
            args.max_streams_per_tenant,
            args.max_stream_duration,
        )),
    };
    let metrics_router = api::metrics_router(state.clone());
    let router = if args.roles.contains(&Role::Api) {
        api::router(state)
    } else {
        healthcheck::probe_router(state)
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", args.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "listening for metrics on {} (--metrics-listen)",
                args.metrics_listen
            )
        })?;
    let metrics_address = metrics_listener.local_addr().unwrap_or(args.metrics_listen);
    tracing::info!(target: LOG_TARGET, listen = %args.listen, metrics_listen = %metrics_address, roles = ?args.roles, "api listening");
    let stopped = |mut shutdown: watch::Receiver<bool>| async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let api_server =
        axum::serve(listener, router).with_graceful_shutdown(stopped(shutdown.clone()));
    let metrics_server = axum::serve(metrics_listener, metrics_router)
        .with_graceful_shutdown(stopped(shutdown.clone()));
    let served = tokio::try_join!(
        async { api_server.await.context("serving the api") },
        async { metrics_server.await.context("serving the metrics") },
    );
    let _ = shutdown_sender.send(true);
    while roles.join_next().await.is_some() {}
    served?;
    tracing::info!(target: LOG_TARGET, "dispatcher stopped");
    Ok(())
}

/// Redis when `--redis-url` is given (trusting `--redis-ca-file` for `rediss://`), else
/// the in-process queue.
async fn connect_queue(args: &ServeArgs) -> anyhow::Result<Queue> {
    if let Some(url) = &args.redis_url {
        let url = url.expose_secret();
        let ca = match &args.redis_ca_file {
            Some(path) => Some(std::fs::read(path).with_context(|| {
                format!(
                    "reading the Redis CA file {} (--redis-ca-file)",
                    path.display()
                )
            })?),
            None => None,
        };
        Ok(Queue::from(
            RedisQueue::connect_trusting(url, ca, &args.redis_prefix, "launchers")
                .await
                .with_context(|| format!("connecting to redis {}", redact_url(url)))?,
        ))
    } else {
        anyhow::ensure!(
            args.redis_ca_file.is_none(),
            "--redis-ca-file needs --redis-url (a rediss:// URL)"
        );
        if args.roles.len() < 3 {
            tracing::warn!(
                target: LOG_TARGET,
                "the in-process queue only works when api and launcher run in the same process"
            );
        }
        Ok(Queue::from(MemoryQueue::new()))
    }
}

/// SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
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
async fn report_tokens(
    store: &Store,
    secret: Option<&SecretString>,
) -> anyhow::Result<ReportTokens> {
    if let Some(secret) = secret {
        anyhow::ensure!(
            secret.expose_secret().len() >= 32,
            "--report-secret must be at least 32 characters"
        );
        return Ok(ReportTokens::new(secret.expose_secret().as_bytes()));
    }
    let generated = SecretString::from(
        store
            .setting_or_create("report_token_key", || {
                hex::encode(rand::random::<[u8; 32]>())
            })
            .await
            .context("reading the report-token key")?,
    );
    Ok(ReportTokens::new(generated.expose_secret().as_bytes()))
}

/// Says, as a warning, when the database acknowledges commits it can lose in a crash: a
/// user's 201 would then be a promise the store may not keep. Not fatal (test and
/// throwaway installs choose it), and a database that cannot say is not refused either.
async fn warn_of_durability_risks(store: &Store) {
    match store.durability_risks().await {
        Ok(risks) => {
            for risk in risks {
                tracing::warn!(target: LOG_TARGET, setting = risk.setting(), "commits are not durable: {risk}");
            }
        }
        Err(error) => {
            tracing::warn!(target: LOG_TARGET, %error, "cannot read the database's durability settings");
        }
    }
}
