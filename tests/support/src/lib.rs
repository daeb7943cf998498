//! Test support for agent-bus integration tests against the real test environment that
//! `tests/env/up` starts: a Kubernetes control plane with kwok nodes, PostgreSQL and Redis.
//!
//! What it owns, and its invariants:
//! - [`TestNamespace`]: one fresh namespace per test, deleted afterwards; when the test
//!   fails, the pods' states and the namespace's events are printed first.
//! - [`TestDatabase`]: one fresh PostgreSQL database per test, dropped afterwards.
//! - [`RedisKeySpace`]: one key prefix per test; its keys are deleted afterwards.
//! - [`poll_until`]: waiting on the cluster is always polling against a deadline, never a
//!   sleep that hopes the work is done.
//! - [`needs_env!`] / [`environment_present`]: a test that needs the environment says so
//!   first; without it the test skips with one `skipped: …` line, and under `make test`
//!   ([`REQUIRE_ENV`], set by `tests/run`) it fails instead, so CI never skips.
//!
//! The environment is found through `KUBECONFIG`, `DATABASE_URL` and `REDIS_URL`, as printed
//! by `tests/env/up`. A helper that finds a variable missing fails with a message that says
//! how to start the environment.
//!
//! The feature `services` (default) brings the PostgreSQL, Redis and Kubernetes helpers and
//! [`poll_until`]; without it (the runner's tests) only the environment checks and the
//! small helpers remain.
//!
//! Test helpers may panic (that is how a test fails), so the workspace's panic lints are
//! relaxed here, and only here.
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::missing_panics_doc
)]

#[cfg(feature = "services")]
mod cluster;
mod needs;
#[cfg(feature = "services")]
mod postgres;
#[cfg(feature = "services")]
mod redis_space;

#[cfg(feature = "services")]
use std::future::Future;
#[cfg(feature = "services")]
use std::time::{Duration, Instant};

#[cfg(feature = "services")]
pub use cluster::{TestNamespace, kube_client, pod_report, with_namespace};
pub use needs::{
    Missing, Need, REQUIRE_ENV, environment_present, environment_required, find_program,
    postgres_bin,
};
#[cfg(feature = "services")]
pub use postgres::{PrivatePostgres, TestDatabase, with_database};
#[cfg(feature = "services")]
pub use redis_space::{RedisKeySpace, with_redis_keyspace};

/// Errors from reaching the test environment.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(
        "environment variable {name} is not set: start the test environment with \
         `eval \"$(tests/env/up)\"` (or run `make test`)"
    )]
    MissingVariable { name: &'static str },
    #[cfg(feature = "services")]
    #[error("kubernetes client for {kubeconfig}: {source}")]
    Kube {
        kubeconfig: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[cfg(feature = "services")]
    #[error("postgres at {url}: {source}")]
    Postgres { url: String, source: sqlx::Error },
    #[cfg(feature = "services")]
    #[error("redis at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
}

/// Reads a variable that `tests/env/up` exports.
pub fn env_var(name: &'static str) -> Result<String, EnvError> {
    std::env::var(name).map_err(|_| EnvError::MissingVariable { name })
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a process under test to
/// listen on. Panics (failing the test) if the OS has no port to give.
#[must_use]
#[allow(clippy::missing_panics_doc, clippy::expect_used)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("binding 127.0.0.1:0 for a free port")
}

/// A program on the PATH that `tests/env/up` exports (helm, kubectl, promtool, amtool,
/// prometheus, alertmanager). Panics (failing the test) with what to do when it is not
/// there.
#[must_use]
#[allow(clippy::missing_panics_doc, clippy::panic)]
pub fn program_on_path(name: &str) -> std::path::PathBuf {
    find_program(name).unwrap_or_else(|| {
        panic!(
            "{name} is not on PATH: start the test environment with `eval \"$(tests/env/up)\"` \
                 (or run `make test`)"
        )
    })
}

/// The repository's root directory (this crate lives in `tests/support`).
#[must_use]
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A short random suffix for names of throwaway objects (lowercase hex, RFC 1123 safe).
#[must_use]
pub fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

#[cfg(feature = "services")]
/// Polls `probe` every `interval` until it returns `Some`, or panics naming `what` once
/// `timeout` has passed. The last observation is kept for the panic message by letting the
/// probe return `Err(observation)`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(100);
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => {
                assert!(
                    Instant::now() < deadline,
                    "timed out after {timeout:?} waiting for {what}; last observation: {last}"
                );
            }
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_secs(1));
    }
}

#[cfg(feature = "services")]
/// How long cluster tests wait for a state the control plane should reach. Generous,
/// because a loaded 2-core machine is slow, and harmless, because polling returns as soon
/// as the state is reached.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(90);
