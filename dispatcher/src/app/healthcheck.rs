//! Health checking from outside the process and probes for every role (part of the app:
//! it answers a command and serves the probe-only router).
//!
//! - `dispatcher healthcheck [--url …]` asks a running dispatcher's probe endpoint and
//!   exits 0 on `200`, 1 otherwise, printing one line that says why. It is the container
//!   image's `HEALTHCHECK` and the Helm chart's `helm test` hook, so neither needs a shell,
//!   curl or wget in the image.
//! - [`probe_router`] serves only `/healthz` and `/readyz`: a process that runs the
//!   launcher or watcher role without the api still answers its Kubernetes probes on
//!   `--listen` (its scrapes go to the metrics listener, as every role's).

use std::fmt::Write as _;
use std::process::ExitCode;

use axum::Router;

use crate::api::{self, AppState};
use crate::config::HealthcheckArgs;

/// Why a health check failed; the message is the one line the command prints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{url} answered {status}{body}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        /// The start of the response body (`/readyz` names the failing dependency), with a
        /// leading `: `, or empty.
        body: String,
    },
    #[error("{url}: {message}")]
    Request { url: String, message: String },
}

/// Asks `args.url` once. `Ok` holds the line to print for a `200`.
pub async fn check(args: &HealthcheckArgs) -> Result<String, Error> {
    let url = args.url.clone();
    let request_error = |error: &reqwest::Error| Error::Request {
        url: url.clone(),
        message: error_chain(error),
    };
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .build()
        .map_err(|e| request_error(&e))?;
    let response = client
        .get(&args.url)
        .send()
        .await
        // The line names the URL already.
        .map_err(|e| request_error(&e.without_url()))?;
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        return Ok(format!("{url} answered {status}"));
    }
    let text = response.text().await.unwrap_or_default();
    let text: String = text.trim().chars().take(300).collect();
    let body = if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    };
    Err(Error::Status { url, status, body })
}

/// The `healthcheck` command: prints one line (stdout when healthy, stderr when not).
pub async fn run(args: &HealthcheckArgs) -> ExitCode {
    match check(args).await {
        Ok(line) => {
            println!("healthy: {line}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("unhealthy: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Only the probes, for a process without the api role.
pub fn probe_router(state: AppState) -> Router {
    api::observed(Router::new(), state)
}

/// An error and its sources on one line (`error sending request: connection refused`).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            let _ = write!(line, ": {text}");
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::StatusCode;

    use super::{Error, check};
    use crate::config::HealthcheckArgs;

    /// Serves `status` with `body` on `/readyz` of a free loopback port.
    async fn serve(status: StatusCode, body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = axum::Router::new().route(
            "/readyz",
            axum::routing::get(move || async move { (status, body) }),
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{address}/readyz")
    }

    fn args(url: String) -> HealthcheckArgs {
        HealthcheckArgs {
            url,
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_200_is_healthy() {
        let url = serve(StatusCode::OK, r#"{"status":"ok"}"#).await;
        let line = check(&args(url.clone())).await.unwrap();
        assert_eq!(line, format!("{url} answered 200 OK"));
    }

    #[tokio::test]
    async fn a_503_is_unhealthy_and_says_what_failed() {
        let url = serve(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"unavailable","failing":["queue: refused"]}"#,
        )
        .await;
        let error = check(&args(url.clone())).await.unwrap_err();
        assert!(matches!(error, Error::Status { .. }));
        assert_eq!(
            error.to_string(),
            format!(
                r#"{url} answered 503 Service Unavailable: {{"status":"unavailable","failing":["queue: refused"]}}"#
            )
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_unhealthy() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/readyz");
        let error = check(&args(url.clone())).await.unwrap_err().to_string();
        assert!(error.starts_with(&format!("{url}: ")), "{error}");
        assert!(!error.contains('\n'), "one line: {error}");
    }
}
