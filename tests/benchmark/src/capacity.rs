//! What one process carries: (c) the API alone at fixed request rates on both stores;
//! (d) the store, queue and launcher path with the Kubernetes create stubbed out
//! (`--executor stub`); (e) resident memory with many active Jobs; (f) submit latency
//! and dispatch rate with a million tasks queued (`--million`).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use dispatcher::queue::{Queue, QueueEntry, RedisQueue};
use dispatcher::task::TaskId;
use futures::StreamExt as _;
use sqlx::Connection as _;

use crate::harness::{Backend, Dispatcher, Env, Seen, Spec};
use crate::load::{now_ms, percentile};
use crate::{Sizes, bench_spec};

/// One rate of (c).
#[derive(Debug, Clone)]
pub(crate) struct ApiStep {
    pub(crate) backend: &'static str,
    pub(crate) rate: u32,
    pub(crate) sent: usize,
    pub(crate) accepted: usize,
    pub(crate) overloaded: usize,
    pub(crate) other: usize,
    pub(crate) timed_out: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) rss_mib: f64,
}

impl ApiStep {
    pub(crate) fn fraction(&self) -> f64 {
        self.accepted as f64 / (self.sent.max(1)) as f64
    }
}

/// (c): `serve --roles api` (nothing launching, so the queue grows as behind busy
/// launchers), each rate of `sizes.api_rates` for `sizes.step`, on PostgreSQL+Redis and
/// on SQLite with the in-process queue.
pub(crate) async fn api_alone(env: &Env, sizes: &Sizes) -> anyhow::Result<Vec<ApiStep>> {
    let mut steps = Vec::new();
    for (backend, label) in [
        (Backend::PostgresRedis, "PostgreSQL+Redis"),
        (Backend::Sqlite, "SQLite"),
    ] {
        let spec = Spec {
            name: format!(
                "api-{}",
                if backend == Backend::Sqlite {
                    "sqlite"
                } else {
                    "pg"
                }
            ),
            backend,
            executor: "kubernetes",
            roles: "api",
        };
        let dispatcher = Dispatcher::start(env, &spec).await?;
        dispatcher.warm_up().await;
        for &rate in &sizes.api_rates {
            let outcome = dispatcher
                .target
                .open_loop(rate, sizes.step, sizes.request_timeout)
                .await;
            let latencies = outcome.latencies();
            let step = ApiStep {
                backend: label,
                rate,
                sent: outcome.sent,
                accepted: outcome.accepted.len(),
                overloaded: outcome.overloaded,
                other: outcome.other_errors,
                timed_out: outcome.timed_out,
                p50_ms: percentile(&latencies, 0.5),
                p99_ms: percentile(&latencies, 0.99),
                rss_mib: dispatcher.rss_mib()?,
            };
            eprintln!(
                "bench: (c) {label} {rate}/s: {}/{} accepted, {} overloaded, p50 {:.1} ms p99 {:.1} ms",
                step.accepted, step.sent, step.overloaded, step.p50_ms, step.p99_ms
            );
            steps.push(step);
        }
        dispatcher.stop(env).await;
    }
    Ok(steps)
}

/// Counts the store's tasks in `launched`.
async fn launched_count(url: &str) -> anyhow::Result<i64> {
    let mut connection = sqlx::PgConnection::connect(url).await?;
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tasks WHERE state = 'launched'")
        .fetch_one(&mut connection)
        .await?;
    connection.close().await?;
    Ok(count)
}

/// (d): what the stubbed pipeline did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stubbed {
    pub(crate) tasks: usize,
    /// Accepted submissions a second (the API's share).
    pub(crate) accepted_per_second: f64,
    /// Tasks `launched` a second, from the first send to the last `launched` event.
    pub(crate) per_second: f64,
    /// Tasks a second from the first claim to the last `launched` event (the launcher's
    /// share, while the API still submits).
    pub(crate) launch_per_second: f64,
}

/// (d): all roles, `--executor stub`, PostgreSQL+Redis; `sizes.stub_tasks` submitted with
/// `sizes.concurrency × 2` in flight.
pub(crate) async fn stubbed_pipeline(env: &Env, sizes: &Sizes) -> anyhow::Result<Stubbed> {
    let spec = Spec {
        name: "stub".to_owned(),
        backend: Backend::PostgresRedis,
        executor: "stub",
        roles: "api,launcher,watcher",
    };
    let dispatcher = Dispatcher::start(env, &spec).await?;
    let outcome = dispatcher
        .target
        .closed_loop(
            sizes.stub_tasks,
            sizes.concurrency * 2,
            sizes.request_timeout,
        )
        .await;
    let deadline = Instant::now() + sizes.drain;
    while launched_count(&dispatcher.database_url).await? < outcome.accepted.len() as i64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recorded = crate::stages::recorded(&dispatcher.database_url).await?;
    dispatcher.stop(env).await;
    let first_sent = outcome
        .accepted
        .iter()
        .map(|a| a.sent_ms)
        .fold(f64::INFINITY, f64::min);
    let launched: Vec<f64> = recorded.values().filter_map(|r| r.launched).collect();
    let first_claim = recorded
        .values()
        .filter_map(|r| r.claimed)
        .fold(f64::INFINITY, f64::min);
    let last = launched.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let stubbed = Stubbed {
        tasks: launched.len(),
        accepted_per_second: outcome.accepted.len() as f64 / outcome.seconds.max(1e-3),
        per_second: launched.len() as f64 / ((last - first_sent) / 1000.0).max(1e-3),
        launch_per_second: launched.len() as f64 / ((last - first_claim) / 1000.0).max(1e-3),
    };
    eprintln!(
        "bench: (d) stub: {} launched, {:.0}/s submit→launched ({:.0}/s accepted, launcher {:.0}/s)",
        stubbed.tasks, stubbed.per_second, stubbed.accepted_per_second, stubbed.launch_per_second
    );
    Ok(stubbed)
}

/// (e): the RSS (MiB, the largest of a few samples) of a dispatcher whose watcher follows
/// `sizes.active_jobs` Jobs it launched, and how many it had when sampled.
pub(crate) async fn rss_with_jobs(env: &Env, sizes: &Sizes) -> anyhow::Result<(f64, usize)> {
    let spec = Spec {
        name: "rss".to_owned(),
        backend: Backend::PostgresRedis,
        executor: "kubernetes",
        roles: "api,launcher,watcher",
    };
    let dispatcher = Dispatcher::start(env, &spec).await?;
    let seen = Seen::watch(&env.client, &dispatcher.namespace).await;
    let outcome = dispatcher
        .target
        .closed_loop(sizes.active_jobs, sizes.concurrency, sizes.request_timeout)
        .await;
    seen.wait_for(
        outcome.accepted.len(),
        sizes.drain.max(Duration::from_mins(5)),
    )
    .await;
    let mut rss: f64 = 0.0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss = rss.max(dispatcher.rss_mib()?);
    }
    let jobs = seen.count();
    dispatcher.stop(env).await;
    eprintln!("bench: (e) RSS {rss:.0} MiB watching {jobs} Jobs");
    Ok((rss, jobs))
}

/// (f): the same figures with and without the backlog.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Million {
    pub(crate) queued: usize,
    pub(crate) rate: u32,
    pub(crate) empty_p50_ms: f64,
    pub(crate) empty_p99_ms: f64,
    pub(crate) full_p50_ms: f64,
    pub(crate) full_p99_ms: f64,
    pub(crate) empty_dispatch: f64,
    pub(crate) full_dispatch: f64,
    pub(crate) insert_seconds: f64,
}

/// Inserts `count` queued tasks as the API would (the task row, its `queued` event, the
/// tenant's queued counter) in batches in SQL, and enqueues each in Redis with the
/// dispatcher's own queue client: what a million submits leave behind, without
/// submitting a million times.
async fn insert_queued(dispatcher: &Dispatcher, env: &Env, count: usize) -> anyhow::Result<()> {
    const BATCH: usize = 10_000;
    let spec = bench_spec()?;
    let json = serde_json::to_string(&spec)?;
    let mut connection = sqlx::PgConnection::connect(&dispatcher.database_url).await?;
    let queue = Queue::from(
        RedisQueue::connect(&env.redis_url, &dispatcher.redis_prefix, "launchers")
            .await
            .context("connecting to redis")?,
    );
    let mut done = 0;
    while done < count {
        let n = BATCH.min(count - done);
        let ids: Vec<TaskId> = (0..n).map(|_| TaskId::new()).collect();
        let texts: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let now = jiff::Timestamp::now().as_millisecond();
        let mut tx = sqlx::Connection::begin(&mut connection).await?;
        sqlx::query(
            "INSERT INTO tasks (id, tenant, name, queue, priority, spec, state, attempt, created_at, updated_at, queued_at, \
             image, resources, timeout_seconds) \
             SELECT id, 'bench', $2, $3, $4, $5, 'queued', 1, $6, $6, $6, $7, $8, $9 FROM UNNEST($1::text[]) AS id",
        )
        .bind(&texts)
        .bind(&spec.name)
        .bind(&spec.queue)
        .bind(spec.priority)
        .bind(&json)
        .bind(now)
        // The columns kept beside the spec, as the API's insert writes them.
        .bind(&spec.image)
        .bind(serde_json::to_string(&spec.resources)?)
        .bind(i64::from(spec.timeout_seconds))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO task_events (task_id, attempt, from_state, to_state, at) \
             SELECT id, 1, NULL, 'queued', $2 FROM UNNEST($1::text[]) AS id",
        )
        .bind(&texts)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE tenants SET queued_tasks = queued_tasks + $1 WHERE name = 'bench'")
            .bind(n as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let results: Vec<_> = futures::stream::iter(ids)
            .map(|task_id| {
                let (queue, entry) = (
                    queue.clone(),
                    QueueEntry {
                        task_id,
                        queue: spec.queue.clone(),
                        priority: spec.priority,
                    },
                );
                async move { queue.enqueue(&entry).await }
            })
            .buffer_unordered(256)
            .collect()
            .await;
        anyhow::ensure!(
            results.iter().all(Result::is_ok),
            "enqueueing the backlog failed"
        );
        done += n;
        if done % 100_000 == 0 {
            eprintln!("bench: (f) {done} queued");
        }
    }
    connection.close().await?;
    Ok(())
}

/// Starts a stub launcher on `api`'s store and queue, and counts tasks `launched` a
/// second over `window` (or until `target` are launched).
async fn dispatch_rate(
    env: &Env,
    api: &Dispatcher,
    window: Duration,
    target: i64,
) -> anyhow::Result<f64> {
    let launcher = Dispatcher::beside(env, api, "stub", "launcher").await?;
    let start_count = launched_count(&api.database_url).await?;
    let started = now_ms();
    let deadline = Instant::now() + window;
    let mut count = start_count;
    while Instant::now() < deadline && count < target {
        tokio::time::sleep(Duration::from_millis(250)).await;
        count = launched_count(&api.database_url).await?;
    }
    let seconds = (now_ms() - started) / 1000.0;
    launcher.stop(env).await;
    Ok((count - start_count) as f64 / seconds.max(1e-3))
}

/// (f): an API dispatcher (stub executor) measured at `sizes.million_rate` for
/// `sizes.step` with a small backlog, its dispatch rate with a stub launcher beside it,
/// then both again with `sizes.million` more tasks queued.
pub(crate) async fn with_a_million(env: &Env, sizes: &Sizes) -> anyhow::Result<Million> {
    let spec = Spec {
        name: "million".to_owned(),
        backend: Backend::PostgresRedis,
        executor: "stub",
        roles: "api",
    };
    let api = Dispatcher::start(env, &spec).await?;
    let latencies = |o: &crate::load::Outcome| {
        let l = o.latencies();
        (percentile(&l, 0.5), percentile(&l, 0.99))
    };
    let warmed = api.warm_up().await;
    let empty = api
        .target
        .open_loop(sizes.million_rate, sizes.step, sizes.request_timeout)
        .await;
    // The small backlog: what the empty-queue run submitted plus the same bulk insert.
    insert_queued(&api, env, sizes.small_backlog).await?;
    let queued_now = (warmed + empty.accepted.len() + sizes.small_backlog) as i64;
    let empty_dispatch = dispatch_rate(env, &api, sizes.dispatch_window, queued_now).await?;
    let started = now_ms();
    insert_queued(&api, env, sizes.million).await?;
    let insert_seconds = (now_ms() - started) / 1000.0;
    let full = api
        .target
        .open_loop(sizes.million_rate, sizes.step, sizes.request_timeout)
        .await;
    let full_dispatch = dispatch_rate(env, &api, sizes.dispatch_window, i64::MAX).await?;
    api.stop(env).await;
    let ((empty_p50_ms, empty_p99_ms), (full_p50_ms, full_p99_ms)) =
        (latencies(&empty), latencies(&full));
    let million = Million {
        queued: sizes.million,
        rate: sizes.million_rate,
        empty_p50_ms,
        empty_p99_ms,
        full_p50_ms,
        full_p99_ms,
        empty_dispatch,
        full_dispatch,
        insert_seconds,
    };
    eprintln!("bench: (f) {million:?}");
    Ok(million)
}
