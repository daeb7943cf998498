//! TLS to PostgreSQL and Redis: the test environment's servers also speak TLS with a
//! certificate of a CA made for the test (`DATABASE_TLS_URL`, `REDIS_TLS_URL`,
//! `AGENT_BUS_TEST_CA`; the certificate names `127.0.0.1` only). A task runs end to end
//! through the real binary over TLS to both; a CA that did not sign the servers'
//! certificate, and a host name the certificate does not carry, are refused with an error
//! that says so; settings that would skip the check are refused before any connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use dispatcher::queue::{QueueError, RedisQueue};
use dispatcher::store::{Store, StoreError};
use serde_json::json;
use sqlx::Connection as _;
use testsupport::{env_var, poll_until, with_database, with_redis_keyspace};

use crate::common::start_local_dispatcher_with;

/// `DATABASE_TLS_URL` on database `name` (it names the server's `postgres` database).
fn tls_url_of(name: &str) -> String {
    let url = env_var("DATABASE_TLS_URL").unwrap();
    let (base, query) = url.split_once('?').unwrap();
    let server = base.rsplit_once('/').unwrap().0;
    format!("{server}/{name}?{query}")
}

/// `url` with `sslrootcert` pointing at `ca` instead.
fn trusting(url: &str, ca: &Path) -> String {
    let test_ca = env_var("AGENT_BUS_TEST_CA").unwrap();
    assert!(url.contains(&test_ca), "{url}");
    url.replace(&test_ca, ca.to_str().unwrap())
}

/// A CA of its own, which signed nothing the servers use: its certificate's path.
fn another_ca() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "agent-bus-other-ca-{}",
        testsupport::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.crt");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=not-the-datastores-ca",
            "-keyout",
        ])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    ca
}

fn test_ca_pem() -> Vec<u8> {
    std::fs::read(env_var("AGENT_BUS_TEST_CA").unwrap()).unwrap()
}

#[tokio::test]
async fn a_task_runs_end_to_end_over_tls_to_both_datastores() {
    testsupport::needs_env!(
        Postgres,
        Redis,
        Var("DATABASE_TLS_URL"),
        Var("REDIS_TLS_URL"),
        Var("AGENT_BUS_TEST_CA")
    );
    with_database(|database| async move {
        with_redis_keyspace(|space| async move {
            let database_url = tls_url_of(&database.name);
            let redis_url = env_var("REDIS_TLS_URL").unwrap();
            let ca = env_var("AGENT_BUS_TEST_CA").unwrap();
            let dispatcher = start_local_dispatcher_with(
                &database_url,
                &[
                    "--redis-url",
                    &redis_url,
                    "--redis-ca-file",
                    &ca,
                    "--redis-prefix",
                    &space.prefix,
                ],
            )
            .await;
            let id = dispatcher
                .submit_as(
                    &dispatcher.key,
                    &json!({"name": "over-tls", "image": "unused", "command": ["sh", "-c", "echo encrypted"]}),
                )
                .await;
            let task = poll_until("the task to succeed", Duration::from_secs(30), || async {
                let task = dispatcher
                    .get_as(&dispatcher.key, &format!("/v1/tasks/{id}"))
                    .await?;
                match task["state"].as_str() {
                    Some("succeeded") => Ok(task),
                    _ => Err(task.to_string()),
                }
            })
            .await;
            assert_eq!(task["message"], "encrypted\n");

            // Every session of the dispatcher on its database is encrypted.
            let mut admin = sqlx::PgConnection::connect(&env_var("DATABASE_URL").unwrap())
                .await
                .unwrap();
            let sessions: Vec<(bool,)> = sqlx::query_as(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = $1",
            )
            .bind(&database.name)
            .fetch_all(&mut admin)
            .await
            .unwrap();
            assert!(!sessions.is_empty());
            assert!(sessions.iter().all(|(ssl,)| *ssl), "{sessions:?}");
            // The queue lives in the Redis behind the TLS port: the task went through it.
            let keys = space.keys().await.unwrap();
            assert!(
                keys.iter().any(|key| key.contains("q:default:")),
                "{keys:?}"
            );
        })
        .await;
    })
    .await;
}

/// `dispatcher ARGS` with `DATABASE_URL`, no Redis or cluster from the environment:
/// (success, stderr).
async fn dispatcher(database_url: &str, args: &[&str]) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("agent-bus-tls-{}", testsupport::unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(args)
        .current_dir(&dir)
        .env("AGENT_BUS_LOG", "warn")
        .env("DATABASE_URL", database_url)
        .env_remove("REDIS_URL")
        .env_remove("KUBECONFIG")
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_ca_that_did_not_sign_the_servers_certificate_is_refused() {
    testsupport::needs_env!(
        Postgres,
        Redis,
        Var("DATABASE_TLS_URL"),
        Var("REDIS_TLS_URL"),
        Var("AGENT_BUS_TEST_CA"),
        Program("openssl")
    );
    let other = another_ca();
    let wrong_database = trusting(&env_var("DATABASE_TLS_URL").unwrap(), &other);
    let redis_url = env_var("REDIS_TLS_URL").unwrap();

    let error = Store::connect(&wrong_database, 1).await.unwrap_err();
    assert!(matches!(error, StoreError::Tls { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.starts_with("TLS to the database failed"),
        "{message}"
    );
    assert!(message.contains("UnknownIssuer"), "{message}");

    let error = RedisQueue::connect_trusting(
        &redis_url,
        Some(std::fs::read(&other).unwrap()),
        "test:wrong-ca:",
        "launchers",
    )
    .await
    .unwrap_err();
    assert!(matches!(error, QueueError::Tls { .. }), "{error:?}");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    // Without a CA file the public roots are trusted, and they did not sign it either.
    let error = RedisQueue::connect_trusting(&redis_url, None, "test:no-ca:", "launchers")
        .await
        .unwrap_err();
    assert!(matches!(error, QueueError::Tls { .. }), "{error:?}");

    // The binary says so and stops: the database first, then Redis.
    let (ok, stderr) = dispatcher(&wrong_database, &["migrate"]).await;
    assert!(!ok);
    assert!(stderr.contains("TLS to the database failed"), "{stderr}");
    let (ok, stderr) = dispatcher(
        "sqlite://agent-bus.db",
        &[
            "serve",
            "--executor",
            "local",
            "--listen",
            &format!("127.0.0.1:{}", testsupport::free_port()),
            "--metrics-listen",
            "127.0.0.1:0",
            "--redis-url",
            &redis_url,
            "--redis-ca-file",
            other.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("TLS to redis failed"), "{stderr}");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    testsupport::needs_env!(
        Postgres,
        Redis,
        Var("DATABASE_TLS_URL"),
        Var("REDIS_TLS_URL"),
        Var("AGENT_BUS_TEST_CA")
    );
    // The servers' certificate names 127.0.0.1 only; `localhost` reaches the same servers.
    let by_name = env_var("DATABASE_TLS_URL")
        .unwrap()
        .replace("@127.0.0.1:", "@localhost:");
    let error = Store::connect(&by_name, 1).await.unwrap_err();
    assert!(matches!(error, StoreError::Tls { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains(r#"certificate not valid for name "localhost""#),
        "{error}"
    );
    // verify-ca checks the CA only: the same server and certificate are then accepted,
    // so the refusal above was the host name's.
    let store = Store::connect(&by_name.replace("verify-full", "verify-ca"), 1)
        .await
        .unwrap();
    store.ping().await.unwrap();

    let redis_by_name = env_var("REDIS_TLS_URL")
        .unwrap()
        .replace("127.0.0.1", "localhost");
    let error = RedisQueue::connect_trusting(
        &redis_by_name,
        Some(test_ca_pem()),
        "test:wrong-host:",
        "launchers",
    )
    .await
    .unwrap_err();
    assert!(matches!(error, QueueError::Tls { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains(r#"certificate not valid for name "localhost""#),
        "{error}"
    );
}

#[tokio::test]
async fn settings_that_would_skip_the_certificate_check_are_refused_before_connecting() {
    // Nothing listens on port 1: these fail on the settings alone.
    let error = Store::connect("postgres://agent@127.0.0.1:1/db?sslmode=require", 1)
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::UnverifiedTls), "{error:?}");
    assert!(error.to_string().contains("sslmode=verify-full"), "{error}");

    let error = RedisQueue::connect("rediss://127.0.0.1:1/#insecure", "test:insecure:", "g")
        .await
        .unwrap_err();
    assert!(matches!(error, QueueError::InsecureTls), "{error:?}");

    let error = RedisQueue::connect_trusting(
        "redis://127.0.0.1:1",
        Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
        "test:plain-with-ca:",
        "g",
    )
    .await
    .unwrap_err();
    assert!(matches!(error, QueueError::TlsSettings { .. }), "{error:?}");

    // The binary refuses a CA file without a Redis URL rather than ignoring it.
    let (ok, stderr) = dispatcher(
        "sqlite://agent-bus.db",
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", testsupport::free_port()),
            "--metrics-listen",
            "127.0.0.1:0",
            "--redis-ca-file",
            "/nonexistent/ca.pem",
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("--redis-ca-file needs --redis-url"),
        "{stderr}"
    );
}
