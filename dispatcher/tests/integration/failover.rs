//! A Redis failover under a running dispatcher: the primary is demoted to a replica (it
//! answers `PING` but refuses every queue command with `READONLY`), then the address the
//! dispatcher uses leads to the new primary, as a Sentinel-managed Service or a cloud
//! endpoint does. Readiness must fail while the queue is unusable and launches resume by
//! themselves once it is usable again.
//!
//! The two Redis servers are the test's own (`redis-server` from the test environment's
//! packages), so demoting one touches nothing shared.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use testsupport::poll_until;

use crate::common::{LocalDispatcher, start_local_dispatcher_with};

/// A `redis-server` of this test's, killed when dropped.
struct OwnRedis {
    port: u16,
    _process: tokio::process::Child,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = testsupport::free_port();
        let process = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let redis = Self {
            port,
            _process: process,
        };
        poll_until(
            &format!("redis-server on port {port}"),
            Duration::from_secs(30),
            || async { redis.command(&["PING"]).await },
        )
        .await;
        redis
    }

    async fn command(&self, args: &[&str]) -> Result<String, String> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .map_err(|e| e.to_string())?;
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command
            .query_async::<redis::Value>(&mut connection)
            .await
            .map(|value| format!("{value:?}"))
            .map_err(|e| e.to_string())
    }
}

/// The address the dispatcher connects to: a TCP proxy to one server, switched to another
/// as a failover switches a Service. Connections already open stay with the old server,
/// as they do in a real failover.
struct ServiceAddress {
    url: String,
    target: Arc<Mutex<u16>>,
}

impl ServiceAddress {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let target = Arc::new(Mutex::new(target));
        let chosen = Arc::clone(&target);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let port = *chosen.lock().unwrap();
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Self { url, target }
    }

    fn switch_to(&self, port: u16) {
        *self.target.lock().unwrap() = port;
    }
}

async fn readiness(dispatcher: &LocalDispatcher) -> Result<(u16, String), String> {
    let response = dispatcher
        .http
        .get(format!("{}/readyz", dispatcher.metrics))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.map_err(|e| e.to_string())?))
}

async fn wait_until_succeeded(dispatcher: &LocalDispatcher, id: &str) {
    poll_until(
        &format!("task {id} to succeed"),
        Duration::from_mins(1),
        || async {
            let task: Value = dispatcher
                .get_as(&dispatcher.key, &format!("/v1/tasks/{id}"))
                .await?;
            match task["state"].as_str() {
                Some("succeeded") => Ok(()),
                Some("failed" | "cancelled" | "timed_out" | "expired") => {
                    panic!("task {id} ended without succeeding: {task}")
                }
                _ => Err(task.to_string()),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_redis_fails_readiness_and_launches_resume_on_the_new_primary() {
    testsupport::needs_env!(Redis);
    let old_primary = OwnRedis::start().await;
    let new_primary = OwnRedis::start().await;
    let address = ServiceAddress::start(old_primary.port).await;
    let dispatcher =
        start_local_dispatcher_with("sqlite://agent-bus.db", &["--redis-url", &address.url]).await;
    let task = json!({"name": "before", "image": "unused", "command": ["true"]});
    let before = dispatcher.submit_as(&dispatcher.key, &task).await;
    wait_until_succeeded(&dispatcher, &before).await;

    // The failover: the old primary becomes a replica of the new one. It still answers
    // PING, so only a check that writes can tell.
    old_primary
        .command(&["REPLICAOF", "127.0.0.1", &new_primary.port.to_string()])
        .await
        .unwrap();
    let failing = poll_until(
        "readiness to fail while Redis is read-only",
        Duration::from_secs(30),
        || async {
            match readiness(&dispatcher).await? {
                (503, body) => Ok(body),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(failing.contains("queue"), "{failing}");

    // The address now leads to the new primary: connections refused with READONLY are
    // dropped, new ones reach it, and the dispatcher is ready and launching again with
    // nobody restarting it.
    address.switch_to(new_primary.port);
    poll_until(
        "readiness to recover on the new primary",
        Duration::from_secs(30),
        || async {
            match readiness(&dispatcher).await? {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let task = json!({"name": "after", "image": "unused", "command": ["true"]});
    let after = dispatcher.submit_as(&dispatcher.key, &task).await;
    wait_until_succeeded(&dispatcher, &after).await;
}
