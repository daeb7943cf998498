//! End to end on the real test environment: the `dispatcher` binary against PostgreSQL,
//! Redis and the Kubernetes control plane with kwok nodes. Each test gets its own
//! namespace, database and Redis key space, and its own dispatcher process(es). Every
//! test needs all three (`needs_env!(Cluster, Postgres, Redis)`) and skips without them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::process::Stdio;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use testsupport::{
    CLUSTER_TIMEOUT, RedisKeySpace, TestDatabase, TestNamespace, poll_until, with_database,
    with_namespace, with_redis_keyspace,
};

/// Keeps finished Jobs for ten minutes (the default deletes a Job once its task's outcome
/// is recorded), so a test can read them afterwards.
const KEEP_JOBS: &[&str] = &["--keep-finished-jobs", "10m"];

/// A dispatcher process under test.
struct Dispatcher {
    child: tokio::process::Child,
    /// The api's listener.
    base: String,
    /// The metrics listener.
    metrics: String,
    http: reqwest::Client,
}

/// What one test runs on: its namespace, database and Redis key space.
struct Setup {
    ns: TestNamespace,
    db: TestDatabase,
    redis: RedisKeySpace,
}

impl Setup {
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"));
        command
            .args(args)
            .env("DATABASE_URL", &self.db.url)
            .env("REDIS_URL", &self.redis.url)
            .env("AGENT_BUS_REDIS_PREFIX", &self.redis.prefix)
            .env("AGENT_BUS_NAMESPACE", &self.ns.name)
            .env("AGENT_BUS_LOG", "warn")
            // kwok reads agent-bus.io/test-* annotations; example.com/ is the tenants'.
            .env(
                "AGENT_BUS_TENANT_ANNOTATION_PREFIXES",
                "agent-bus.io/test-,example.com/",
            )
            .env("AGENT_BUS_TENANT_LABEL_PREFIXES", "example.com/")
            .env("AGENT_BUS_UNSCHEDULABLE_AFTER", "1")
            .kill_on_drop(true);
        command
    }

    async fn tenant(&self, name: &str) -> String {
        let output = self
            .command(&["tenant", "create", name])
            .stderr(Stdio::inherit())
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    async fn start(&self) -> Dispatcher {
        self.start_as("dispatcher-under-test").await
    }

    /// Starts a dispatcher that keeps the Jobs of finished tasks ([`KEEP_JOBS`]), for
    /// tests that look at a Job or pod after the outcome.
    async fn start_keeping_jobs(&self) -> Dispatcher {
        self.start_with("dispatcher-under-test", KEEP_JOBS).await
    }

    /// Starts a dispatcher whose queue consumer and lease identity is `instance`.
    async fn start_as(&self, instance: &str) -> Dispatcher {
        self.start_with(instance, &[]).await
    }

    /// Starts a dispatcher with `extra` flags.
    async fn start_with(&self, instance: &str, extra: &[&str]) -> Dispatcher {
        self.start_with_env(instance, extra, &[]).await
    }

    /// Starts a dispatcher with `extra` flags and environment variables (`KUBECONFIG`
    /// of another identity, …).
    async fn start_with_env(
        &self,
        instance: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Dispatcher {
        let port = testsupport::free_port();
        let listen = format!("127.0.0.1:{port}");
        let metrics = format!("127.0.0.1:{}", testsupport::free_port());
        let mut args = vec![
            "serve",
            "--executor",
            "kubernetes",
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics,
            "--reconcile-interval",
            "1",
            "--launching-stale-after",
            "2",
        ];
        args.extend_from_slice(extra);
        let child = self
            .command(&args)
            .envs(env.iter().copied())
            .env("AGENT_BUS_INSTANCE", instance)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let dispatcher = Dispatcher {
            child,
            base: format!("http://{listen}"),
            metrics: format!("http://{metrics}"),
            http: reqwest::Client::new(),
        };
        crate::common::wait_until_ready(&dispatcher.http, &dispatcher.base, CLUSTER_TIMEOUT).await;
        dispatcher
    }
}

impl Dispatcher {
    async fn post(
        &self,
        key: &str,
        path: &str,
        body: &Value,
        idempotency: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(body);
        if let Some(idempotency) = idempotency {
            request = request.header("idempotency-key", idempotency);
        }
        let response = request.send().await.unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    async fn get(&self, key: &str, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_for_state(&self, key: &str, id: &str, states: &[&str]) -> Value {
        poll_until(
            &format!("task {id} to reach {states:?}"),
            CLUSTER_TIMEOUT,
            || async {
                let task = self.get(key, &format!("/v1/tasks/{id}")).await;
                if states.contains(&task["state"].as_str().unwrap_or_default()) {
                    Ok(task)
                } else {
                    Err(task.to_string())
                }
            },
        )
        .await
    }

    fn kill(&mut self) {
        // SIGKILL: no shutdown code runs, as in a crash.
        let _ = self.child.start_kill();
    }
}

/// Runs `body` with a namespace, a database and a Redis key space.
async fn with_environment<F, Fut>(prefix: &str, body: F)
where
    F: FnOnce(Setup) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    with_namespace(prefix, |ns| async move {
        with_database(|db| async move {
            with_redis_keyspace(|redis| async move { body(Setup { ns, db, redis }).await }).await;
        })
        .await;
    })
    .await;
}

async fn jobs_of(ns: &TestNamespace, task_id: &str) -> Vec<Job> {
    let simple = task_id.replace('-', "");
    ns.api::<Job>()
        .list(&ListParams::default().labels(&format!("agent-bus.io/task-id={simple}")))
        .await
        .unwrap()
        .items
}

mod cost_alert;
mod lease;
mod lifecycle;
mod logs;
mod placement;
mod quota;
mod recovery;
mod retries;
mod secrets;
mod security;
mod throttled;
mod views;
