//! What every part stands on: a dispatcher process of its own (a fresh PostgreSQL
//! database or SQLite file, a Redis key prefix, a tenant and its key, free ports), a
//! namespace with a watch that notes when each Job is first seen, the dispatcher's
//! resident memory, and its `/metrics`. Everything made here is removed by `stop`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dispatcher::launcher::job_spec::LABEL_TASK_ID;
use dispatcher::store::Store;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use sqlx::Connection as _;

use crate::load::{Target, now_ms};

/// What the bench was pointed at (not `Debug`: kube's client is not).
#[derive(Clone)]
pub(crate) struct Env {
    pub(crate) dispatcher: PathBuf,
    pub(crate) kubeconfig: PathBuf,
    pub(crate) database_url: String,
    pub(crate) redis_url: String,
    pub(crate) client: Client,
    /// Unique to this run: every database, namespace and key prefix carries it.
    pub(crate) suffix: String,
}

/// Where a dispatcher keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A fresh PostgreSQL database and a Redis key prefix.
    PostgresRedis,
    /// A fresh SQLite file and the in-process queue (the embedded defaults).
    Sqlite,
}

/// How to start one dispatcher.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// Unique within the run: names its database, namespace and key prefix.
    pub(crate) name: String,
    pub(crate) backend: Backend,
    /// `kubernetes` or `stub`.
    pub(crate) executor: &'static str,
    /// `--roles`.
    pub(crate) roles: &'static str,
}

/// A running dispatcher and what was made for it.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    child: tokio::process::Child,
    pub(crate) target: Target,
    pub(crate) metrics_url: String,
    /// The dispatcher's own store, for the bench's reads (stage times) and bulk inserts.
    pub(crate) database_url: String,
    pub(crate) namespace: String,
    pub(crate) redis_prefix: String,
    database: Option<String>,
    sqlite_file: Option<PathBuf>,
    /// Whether `stop` removes the namespace (a process `beside` another does not).
    owned: bool,
}

/// The stub's secret folder: one of this run, never the working folder's default.
fn secrets_dir(namespace: &str) -> String {
    std::env::temp_dir()
        .join(format!("agent-bus-{namespace}-secrets"))
        .display()
        .to_string()
}

/// Submissions of [`Dispatcher::warm_up`].
const WARM_UP: usize = 100;

/// The dispatchers' logs: errors only, and not the HTTP layer's line per 503 (the bench
/// counts those itself).
const LOG_FILTER: &str = "error,tower_http=off";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs one statement on the server of `url` (creating and dropping the bench databases).
async fn admin_statement(url: &str, sql: String) -> anyhow::Result<()> {
    let mut connection = sqlx::PgConnection::connect(url).await?;
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut connection)
        .await?;
    connection.close().await?;
    Ok(())
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

pub(crate) async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
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

/// Deletes a namespace in the background (its Jobs go with it).
pub(crate) async fn delete_namespace(client: &Client, name: &str) {
    let _ = Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::background())
        .await;
}

impl Dispatcher {
    /// Makes the store (migrated, one tenant), the namespace, and starts the process;
    /// returns once it answers `/readyz`.
    pub(crate) async fn start(env: &Env, spec: &Spec) -> anyhow::Result<Self> {
        let name = format!("{}-{}", spec.name, env.suffix);
        let namespace = format!("bench-{name}");
        let redis_prefix = format!("bench:{name}:");
        let (database_url, database, sqlite_file) = match spec.backend {
            Backend::PostgresRedis => {
                let database = format!("bench_{}", name.replace('-', "_"));
                // The name is ours: a fixed prefix, letters, digits and underscores.
                admin_statement(&env.database_url, format!("CREATE DATABASE \"{database}\""))
                    .await?;
                (
                    replace_database(&env.database_url, &database),
                    Some(database),
                    None,
                )
            }
            Backend::Sqlite => {
                let file = std::env::temp_dir().join(format!("agent-bus-bench-{name}.db"));
                (format!("sqlite://{}", file.display()), None, Some(file))
            }
        };
        let store = Store::connect(&database_url, 2).await?;
        store.migrate().await?;
        let key = dispatcher::api::new_api_key();
        let key = dispatcher::api::ExposeSecret::expose_secret(&key).to_owned();
        // Room for the million of `--million`: the quota is not what is measured.
        store
            .create_tenant("bench", &dispatcher::api::hash_api_key(&key), 10_000_000)
            .await?;
        store.close().await;
        if spec.executor == "kubernetes" {
            create_namespace(&env.client, &namespace).await?;
        }

        let (port, metrics_port) = (free_port()?, free_port()?);
        let mut command = tokio::process::Command::new(&env.dispatcher);
        command
            .args(["serve", "--executor", spec.executor, "--roles", spec.roles])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--namespace", &namespace, "--log-filter", LOG_FILTER])
            .args(["--kubeconfig", &env.kubeconfig.display().to_string()])
            .args(["--database-url", &database_url])
            // Secrets of the stub and local paths: a folder of this run, never the cwd's.
            .args(["--local-secrets-dir", &secrets_dir(&namespace)])
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if spec.backend == Backend::PostgresRedis {
            command.args([
                "--redis-url",
                &env.redis_url,
                "--redis-prefix",
                &redis_prefix,
            ]);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", env.dispatcher.display()))?;
        let target = Target::new(format!("http://127.0.0.1:{port}"), key)?;
        let dispatcher = Self {
            child,
            target,
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            database_url,
            namespace,
            redis_prefix,
            database,
            sqlite_file,
            owned: true,
        };
        dispatcher.wait_ready().await?;
        Ok(dispatcher)
    }

    /// Another process on `other`'s store, queue and namespace (another role beside
    /// it); owns none of them, so its `stop` removes nothing.
    pub(crate) async fn beside(
        env: &Env,
        other: &Self,
        executor: &'static str,
        roles: &'static str,
    ) -> anyhow::Result<Self> {
        let (port, metrics_port) = (free_port()?, free_port()?);
        let child = tokio::process::Command::new(&env.dispatcher)
            .args(["serve", "--executor", executor, "--roles", roles])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--namespace", &other.namespace, "--log-filter", LOG_FILTER])
            .args(["--kubeconfig", &env.kubeconfig.display().to_string()])
            .args(["--database-url", &other.database_url])
            .args([
                "--redis-url",
                &env.redis_url,
                "--redis-prefix",
                &other.redis_prefix,
            ])
            .args(["--local-secrets-dir", &secrets_dir(&other.namespace)])
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", env.dispatcher.display()))?;
        let dispatcher = Self {
            child,
            target: Target::new(format!("http://127.0.0.1:{port}"), other.target.key.clone())?,
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            database_url: other.database_url.clone(),
            namespace: other.namespace.clone(),
            redis_prefix: other.redis_prefix.clone(),
            database: None,
            sqlite_file: None,
            owned: false,
        };
        dispatcher.wait_ready().await?;
        Ok(dispatcher)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let ready = self
                .target
                .http
                .get(format!("{}/readyz", self.target.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the dispatcher did not become ready within a minute");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A few submissions before a measured API run, so that the first measured requests
    /// do not pay for opening the pool's connections (a fresh process's cold start);
    /// their tasks stay queued.
    pub(crate) async fn warm_up(&self) -> usize {
        self.target
            .closed_loop(WARM_UP, 16, Duration::from_secs(5))
            .await
            .accepted
            .len()
    }

    /// VmRSS of the process, in MiB.
    pub(crate) fn rss_mib(&self) -> anyhow::Result<f64> {
        let pid = self.child.id().context("the dispatcher has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
        Ok(kib / 1024.0)
    }

    /// The text of `/metrics`.
    pub(crate) async fn scrape(&self) -> anyhow::Result<String> {
        Ok(self
            .target
            .http
            .get(&self.metrics_url)
            .send()
            .await?
            .text()
            .await?)
    }

    /// Stops the process and removes its database, file and namespace.
    pub(crate) async fn stop(mut self, env: &Env) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        if self.owned {
            delete_namespace(&env.client, &self.namespace).await;
            let _ = std::fs::remove_dir_all(secrets_dir(&self.namespace));
        }
        if let Some(database) = &self.database {
            let _ = admin_statement(
                &env.database_url,
                format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"),
            )
            .await;
        }
        if self.owned && self.database.is_some() {
            // The streams of this prefix: the million run's hold a million entries, in a
            // Redis others share.
            let _ = remove_keys(&env.redis_url, &self.redis_prefix).await;
        }
        if let Some(file) = &self.sqlite_file {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
        }
    }
}

/// Unlinks every Redis key under `prefix`.
async fn remove_keys(url: &str, prefix: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await?;
    for key in keys {
        let _: i64 = redis::cmd("UNLINK")
            .arg(key)
            .query_async(&mut connection)
            .await?;
    }
    Ok(())
}

/// When a watch first saw each Job, by task id label (32 hex digits), in wall-clock ms.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen(Arc<Mutex<HashMap<String, f64>>>);

impl Seen {
    /// Starts a watch of the Jobs of `namespace`; it ends with the process.
    pub(crate) async fn watch(client: &Client, namespace: &str) -> Self {
        let seen = Self::default();
        let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
        let record = seen.0.clone();
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
                        seen.entry(id).or_insert_with(now_ms);
                    }
                    futures::future::ready(Ok(()))
                })
                .await;
        });
        // The watch's initial list, before anything is created.
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen
    }

    /// When the Job of task `id` (hyphenated or not) was seen.
    pub(crate) fn at(&self, id: &str) -> Option<f64> {
        let key = id.replace('-', "");
        self.0.lock().ok().and_then(|s| s.get(&key).copied())
    }

    pub(crate) fn count(&self) -> usize {
        self.0.lock().map(|s| s.len()).unwrap_or_default()
    }

    /// Waits until `count` Jobs were seen or `limit` passed; false on the limit.
    pub(crate) async fn wait_for(&self, count: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.count() < count {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}
