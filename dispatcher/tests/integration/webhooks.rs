//! Webhooks end to end: the `dispatcher` binary (local executor) delivers to a receiver
//! in this test, which checks the Standard Webhooks signature with the secret `dispatcher
//! tenant webhook-secret` prints; a receiver that is down, then failing, then up gets the
//! delivery with the same id every time; a kill -9 loses nothing; redirects are not
//! followed; and without `--webhook-allowed-hosts` every internal destination is refused,
//! at submit or when sending, with the reason in `GET /v1/tasks/{id}/webhooks`; an https
//! receiver with a private CA is reached once the operator trusts it (`--webhook-ca-file`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse as _;
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;
use testsupport::poll_until;
use tokio::io::AsyncBufReadExt as _;

use crate::common::{LocalDispatcher, start_local_dispatcher_with, wait_until_ready};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

/// A webhook receiver on 127.0.0.1: records every request and answers with the next
/// scripted status (200 once the script is spent); `/redirect` answers 307 to `/other`.
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<StatusCode>>>,
}

impl Receiver {
    /// Starts answering on `port` (which may have been refusing connections until now).
    async fn listen(&self, port: u16) -> tokio::task::JoinHandle<()> {
        let receiver = self.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
                let receiver = receiver.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    receiver.received.lock().unwrap().push(Received {
                        path: uri.path().to_owned(),
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        body,
                    });
                    if uri.path() == "/redirect" {
                        return (
                            StatusCode::TEMPORARY_REDIRECT,
                            [("location", "/other")],
                            "moved",
                        )
                            .into_response();
                    }
                    let status = receiver
                        .script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(StatusCode::OK);
                    status.into_response()
                }
            },
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        })
    }

    fn received(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

/// Whether `signature` (`v1,<base64>`, possibly several separated by spaces) is the
/// HMAC-SHA256 of `id.timestamp.body` with the key of `secret` (`whsec_<base64>`): the
/// check a receiver makes, written from the specification.
fn verifies(secret: &str, received: &Received) -> bool {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", received.id, received.timestamp, received.body).as_bytes());
    let expected = format!("v1,{}", engine.encode(mac.finalize().into_bytes()));
    received
        .signature
        .split(' ')
        .any(|signature| signature == expected)
}

/// `dispatcher ARGS` against the dispatcher's database: (success, stdout, stderr).
async fn cli(
    dispatcher: &LocalDispatcher,
    database_url: &str,
    args: &[&str],
) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(args)
        .current_dir(&dispatcher.dir)
        .env("AGENT_BUS_LOG", "warn")
        .env("DATABASE_URL", database_url)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    )
}

/// Kills the dispatcher with SIGKILL and starts it again on the same folder, database
/// and ports.
async fn kill_and_restart(dispatcher: &mut LocalDispatcher, database_url: &str, flags: &[&str]) {
    dispatcher.child.start_kill().unwrap();
    dispatcher.child.wait().await.unwrap();
    let listen = dispatcher.base.trim_start_matches("http://").to_owned();
    let metrics = dispatcher.metrics.trim_start_matches("http://").to_owned();
    let mut args = vec![
        "serve",
        "--executor",
        "local",
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics,
    ];
    args.extend_from_slice(flags);
    dispatcher.child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(&args)
        .current_dir(&dispatcher.dir)
        .env("AGENT_BUS_LOG", "warn")
        .env("DATABASE_URL", database_url)
        .env_remove("REDIS_URL")
        .env_remove("KUBECONFIG")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until_ready(&dispatcher.http, &dispatcher.base, Duration::from_secs(30)).await;
}

async fn wait_until_over(dispatcher: &LocalDispatcher, id: &str) -> Value {
    poll_until(
        &format!("task {id} to end"),
        Duration::from_secs(30),
        || async {
            let task = dispatcher
                .get_as(&dispatcher.key, &format!("/v1/tasks/{id}"))
                .await?;
            let state = task["state"].as_str().unwrap_or_default();
            if ["succeeded", "failed", "cancelled", "timed_out", "expired"].contains(&state) {
                Ok(task)
            } else {
                Err(task.to_string())
            }
        },
    )
    .await
}

/// Polls `GET /v1/tasks/{id}/webhooks` until its first delivery satisfies `done`.
async fn wait_for_delivery(
    dispatcher: &LocalDispatcher,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    poll_until(what, Duration::from_mins(1), || async {
        let list = dispatcher
            .get_as(&dispatcher.key, &format!("/v1/tasks/{id}/webhooks"))
            .await?;
        match list["items"].get(0) {
            Some(delivery) if done(delivery) => Ok(delivery.clone()),
            _ => Err(list.to_string()),
        }
    })
    .await
}

fn task_with_webhook(name: &str, url: &str) -> Value {
    json!({"name": name, "image": "unused", "command": ["true"], "webhook": {"url": url}})
}

/// Flags of a dispatcher that may deliver to loopback, retrying fast.
const LOOPBACK_FLAGS: [&str; 6] = [
    "--webhook-allowed-hosts",
    "127.0.0.1",
    "--webhook-backoff",
    "1s",
    "--webhook-timeout",
    "2s",
];

async fn signed_and_retried_until_delivered(database_url: &str) {
    let dispatcher = start_local_dispatcher_with(database_url, &LOOPBACK_FLAGS).await;
    let (ok, secret, stderr) = cli(
        &dispatcher,
        database_url,
        &["tenant", "webhook-secret", "acme"],
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(secret.starts_with("whsec_"), "{secret}");
    let (_, again, _) = cli(
        &dispatcher,
        database_url,
        &["tenant", "webhook-secret", "acme"],
    )
    .await;
    assert_eq!(
        again, secret,
        "printing the secret again does not change it"
    );

    // The receiver is down: attempts fail and are retried.
    let port = testsupport::free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let id = dispatcher
        .submit_as(&dispatcher.key, &task_with_webhook("hooked", &url))
        .await;
    let task = wait_until_over(&dispatcher, &id).await;
    assert_eq!(task["state"], "succeeded");
    assert_eq!(
        task["webhook"],
        json!({"url": url, "events": ["terminal"]}),
        "shown in the task view"
    );
    let pending = wait_for_delivery(&dispatcher, &id, "two failed attempts", |d| {
        d["attempts"].as_array().is_some_and(|a| a.len() >= 2)
    })
    .await;
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["event_type"], "task.succeeded");
    assert!(pending["attempts"][0]["status_code"].is_null());
    assert!(
        pending["attempts"][0]["error"].as_str().is_some(),
        "{pending}"
    );

    // Up, but failing once: the next attempt is a retry with the same id and body.
    let receiver = Receiver::default();
    receiver
        .script
        .lock()
        .unwrap()
        .push_back(StatusCode::SERVICE_UNAVAILABLE);
    let _server = receiver.listen(port).await;
    let delivered = wait_for_delivery(&dispatcher, &id, "the delivery", |d| {
        d["state"] == "delivered"
    })
    .await;
    let got = receiver.received("/hook");
    assert_eq!(got.len(), 2, "one 503, then the 200: {got:?}");
    let delivery_id = delivered["id"].as_str().unwrap();
    for request in &got {
        assert_eq!(
            request.id, delivery_id,
            "the same webhook-id on every attempt"
        );
        assert_eq!(request.body, got[0].body, "the same bytes on every attempt");
        assert!(verifies(&secret, request), "signature of {request:?}");
        let sent: i64 = request.timestamp.parse().unwrap();
        assert!((jiff::Timestamp::now().as_second() - sent).abs() < 120);
    }
    let attempts = delivered["attempts"].as_array().unwrap();
    assert_eq!(
        delivered["attempt_count"].as_u64(),
        Some(attempts.len() as u64)
    );
    let codes: Vec<Value> = attempts.iter().map(|a| a["status_code"].clone()).collect();
    assert_eq!(&codes[codes.len() - 2..], [json!(503), json!(200)]);
    assert!(delivered["delivered_at"].is_string());

    // The body: the event, its time, and the task as the API shows it.
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "task.succeeded");
    assert!(
        body["timestamp"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok()
    );
    for field in [
        "id",
        "tenant",
        "state",
        "exit_code",
        "name",
        "webhook",
        "finished_at",
    ] {
        assert_eq!(body["data"][field], task[field], "data.{field}");
    }

    // A wrong secret does not verify (the check above means something).
    assert!(!verifies("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &got[0]));

    // A redirect is not followed: its status is recorded and the target never asked.
    let redirect = format!("http://127.0.0.1:{port}/redirect");
    let id = dispatcher
        .submit_as(&dispatcher.key, &task_with_webhook("redirected", &redirect))
        .await;
    let delivery = wait_for_delivery(&dispatcher, &id, "an attempt answered 307", |d| {
        d["attempts"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(delivery["attempts"][0]["status_code"], 307);
    assert!(
        delivery["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("redirects are not followed"),
        "{delivery}"
    );
    assert!(receiver.received("/other").is_empty());

    // Rotating replaces the secret.
    let (ok, rotated, _) = cli(
        &dispatcher,
        database_url,
        &["tenant", "webhook-secret", "acme", "--rotate"],
    )
    .await;
    assert!(ok);
    assert!(rotated.starts_with("whsec_") && rotated != secret);

    // Another tenant's task: 404, like the task itself.
    let (ok, other, stderr) = cli(&dispatcher, database_url, &["tenant", "create", "globex"]).await;
    assert!(ok, "{stderr}");
    let answer = dispatcher
        .http
        .get(format!("{}/v1/tasks/{}/webhooks", dispatcher.base, id))
        .bearer_auth(other)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
}

#[tokio::test]
async fn deliveries_are_signed_and_retried_until_the_receiver_is_up_sqlite() {
    signed_and_retried_until_delivered("sqlite://agent-bus.db").await;
}

#[tokio::test]
async fn deliveries_are_signed_and_retried_until_the_receiver_is_up_postgres() {
    testsupport::needs_env!(Postgres);
    testsupport::with_database(|db| async move {
        signed_and_retried_until_delivered(&db.url).await;
    })
    .await;
}

#[tokio::test]
async fn a_delivery_is_not_lost_to_a_kill_9() {
    let database_url = "sqlite://agent-bus.db";
    let mut dispatcher = start_local_dispatcher_with(database_url, &LOOPBACK_FLAGS).await;
    let (ok, secret, _) = cli(
        &dispatcher,
        database_url,
        &["tenant", "webhook-secret", "acme"],
    )
    .await;
    assert!(ok);
    // The tenant's default webhook, for a task that names none.
    let port = testsupport::free_port();
    let url = format!("http://127.0.0.1:{port}/default");
    let (ok, line, stderr) = cli(
        &dispatcher,
        database_url,
        &["tenant", "set-webhook", "acme", "--url", &url],
    )
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(line, format!("acme: {url} (terminal)"));

    let id = dispatcher
        .submit_as(
            &dispatcher.key,
            &json!({"name": "plain", "image": "unused", "command": ["true"]}),
        )
        .await;
    wait_until_over(&dispatcher, &id).await;
    wait_for_delivery(&dispatcher, &id, "a failed attempt", |d| {
        d["attempt_count"].as_u64() >= Some(1)
    })
    .await;

    kill_and_restart(&mut dispatcher, database_url, &LOOPBACK_FLAGS).await;
    let receiver = Receiver::default();
    let _server = receiver.listen(port).await;
    let delivered = wait_for_delivery(&dispatcher, &id, "the delivery after the restart", |d| {
        d["state"] == "delivered"
    })
    .await;
    let got = receiver.received("/default");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, delivered["id"].as_str().unwrap());
    assert!(verifies(&secret, &got[0]));

    let (ok, line, _) = cli(
        &dispatcher,
        database_url,
        &["tenant", "set-webhook", "acme", "--clear"],
    )
    .await;
    assert!(ok);
    assert_eq!(line, "acme: no default webhook");
}

#[tokio::test]
async fn internal_destinations_are_refused_without_an_allow_list() {
    let database_url = "sqlite://agent-bus.db";
    let dispatcher = start_local_dispatcher_with(database_url, &["--webhook-backoff", "1s"]).await;
    let submit = |body: Value| {
        let dispatcher = &dispatcher;
        async move {
            let answer = dispatcher
                .http
                .post(format!("{}/v1/tasks", dispatcher.base))
                .bearer_auth(&dispatcher.key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                answer.status().as_u16(),
                answer.json::<Value>().await.unwrap(),
            )
        }
    };
    // Refused at submit: other schemes, and IP literals of internal addresses.
    for url in [
        "file:///etc/passwd",
        "ftp://example.com/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://[::1]/",
        "http://[fd00:ec2::254]/",
        "http://user:pw@example.com/",
    ] {
        let (status, body) = submit(task_with_webhook("refused", url)).await;
        assert_eq!(status, 422, "{url}: {body}");
        assert_eq!(body["error"]["field"], "webhook.url", "{url}: {body}");
    }
    let (status, body) = submit(
        json!({"name": "refused", "image": "unused", "command": ["true"],
        "webhook": {"url": "https://example.com/", "events": ["finished"]}}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("webhook.events"))
    );

    // A name that resolves to loopback is accepted, and refused when sending; nothing
    // reaches the receiver listening there.
    let receiver = Receiver::default();
    let port = testsupport::free_port();
    let _server = receiver.listen(port).await;
    let localhost = format!("http://localhost:{port}/hook");
    let id = dispatcher
        .submit_as(&dispatcher.key, &task_with_webhook("local", &localhost))
        .await;
    wait_until_over(&dispatcher, &id).await;
    let refused =
        wait_for_delivery(&dispatcher, &id, "the refusal", |d| d["state"] == "failed").await;
    let why = refused["last_error"].as_str().unwrap();
    assert!(
        why.contains("refused") && why.contains("loopback"),
        "{refused}"
    );
    assert_eq!(refused["attempt_count"], 1, "a refusal is not retried");
    assert!(refused["given_up_at"].is_string());

    // IP literals an operator set as the tenant's default are refused when sending.
    for (url, reason) in [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.1.2.3/", "private"),
        ("http://[::1]:9/", "loopback"),
    ] {
        let (ok, _, stderr) = cli(
            &dispatcher,
            database_url,
            &["tenant", "set-webhook", "acme", "--url", url],
        )
        .await;
        assert!(ok, "{stderr}");
        let id = dispatcher
            .submit_as(
                &dispatcher.key,
                &json!({"name": "defaulted", "image": "unused", "command": ["true"]}),
            )
            .await;
        wait_until_over(&dispatcher, &id).await;
        let refused =
            wait_for_delivery(&dispatcher, &id, "the refusal", |d| d["state"] == "failed").await;
        let why = refused["last_error"].as_str().unwrap();
        assert!(
            why.contains("refused") && why.contains(reason),
            "{url}: {refused}"
        );
        assert_eq!(refused["attempts"][0]["status_code"], Value::Null);
    }
    assert!(
        receiver.received("/hook").is_empty(),
        "nothing reached loopback"
    );
    let (ok, _, stderr) = cli(
        &dispatcher,
        database_url,
        &[
            "tenant",
            "set-webhook",
            "acme",
            "--url",
            "ftp://example.com/",
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("--url") && stderr.contains("ftp"),
        "{stderr}"
    );

    let metrics = crate::common::scrape(&dispatcher.http, &dispatcher.metrics).await;
    assert!(
        metrics.contains("agent_bus_webhook_deliveries_total{result=\"refused\"} 4"),
        "{metrics}"
    );
}

/// An https receiver (Python's http.server behind its ssl module) with the test
/// environment's server certificate, which a CA made for the test signed and which names
/// 127.0.0.1. Prints `ready`, then one JSON line per request; answers 200.
const HTTPS_RECEIVER: &str = r#"
import http.server, json, ssl, sys
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
        print(json.dumps({"path": self.path, "id": self.headers.get("webhook-id", ""),
                          "timestamp": self.headers.get("webhook-timestamp", ""),
                          "signature": self.headers.get("webhook-signature", ""),
                          "body": body}), flush=True)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"#;

/// Deliveries over https: a receiver whose certificate no Mozilla root signed is
/// refused with the certificate error, retried, and delivered once the operator trusts
/// its CA with `--webhook-ca-file`.
#[tokio::test]
async fn https_receivers_are_trusted_through_the_operators_ca() {
    testsupport::needs_env!(Var("AGENT_BUS_TEST_CA"), Program("python3"));
    let ca = testsupport::env_var("AGENT_BUS_TEST_CA").unwrap();
    let tls_dir = std::path::Path::new(&ca).parent().unwrap().to_owned();
    let port = testsupport::free_port();
    let mut receiver = tokio::process::Command::new("python3")
        .args(["-c", HTTPS_RECEIVER, &port.to_string()])
        .arg(tls_dir.join("server.crt"))
        .arg(tls_dir.join("server.key"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));

    let database_url = "sqlite://agent-bus.db";
    let mut dispatcher = start_local_dispatcher_with(database_url, &LOOPBACK_FLAGS).await;
    let (ok, secret, _) = cli(
        &dispatcher,
        database_url,
        &["tenant", "webhook-secret", "acme"],
    )
    .await;
    assert!(ok);
    let url = format!("https://127.0.0.1:{port}/secure");
    let id = dispatcher
        .submit_as(&dispatcher.key, &task_with_webhook("tls", &url))
        .await;
    wait_until_over(&dispatcher, &id).await;
    let refused = wait_for_delivery(&dispatcher, &id, "a refused attempt", |d| {
        d["attempt_count"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(refused["state"], "pending", "retried: {refused}");
    let error = refused["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("certificate"), "{refused}");

    let mut flags = LOOPBACK_FLAGS.to_vec();
    flags.extend(["--webhook-ca-file", ca.as_str()]);
    kill_and_restart(&mut dispatcher, database_url, &flags).await;
    let delivered = wait_for_delivery(&dispatcher, &id, "the delivery over https", |d| {
        d["state"] == "delivered"
    })
    .await;
    // The first request the receiver saw through is the delivery, signed.
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let got: Value = serde_json::from_str(&line).unwrap();
    let delivery = Received {
        path: got["path"].as_str().unwrap().to_owned(),
        id: got["id"].as_str().unwrap().to_owned(),
        timestamp: got["timestamp"].as_str().unwrap().to_owned(),
        signature: got["signature"].as_str().unwrap().to_owned(),
        body: got["body"].as_str().unwrap().to_owned(),
    };
    assert_eq!(delivery.path, "/secure");
    assert_eq!(delivery.id, delivered["id"].as_str().unwrap());
    assert!(verifies(&secret, &delivery));

    // A file without a certificate is refused at start, naming the flag.
    let empty = dispatcher.dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(["serve", "--executor", "local", "--webhook-ca-file"])
        .arg(&empty)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .current_dir(&dispatcher.dir)
        .env("DATABASE_URL", database_url)
        .env_remove("REDIS_URL")
        .env_remove("KUBECONFIG")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--webhook-ca-file"), "{stderr}");
}
