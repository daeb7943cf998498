//! The application: wires the library's parts into the commands the binary runs. It owns
//! what happens at the top of the process and nothing below it: logging, the command
//! dispatch, and (in submodules) `serve`, the tenant commands, the executor choice and
//! the health check. This is the only place that uses `anyhow`; everything it calls
//! returns typed errors, which it gives context.
//!
//! - `serve`: builds the store, queue, executor and roles and runs them until a signal;
//! - `settings`: the library's configuration structs, built from the parsed flags;
//! - `executor`: which executor runs tasks, the Kubernetes client, the local runner;
//! - `tenant`: `migrate` and the `tenant` commands;
//! - [`healthcheck`]: `dispatcher healthcheck` and the probe-only router.

pub mod healthcheck;

mod executor;
mod serve;
mod settings;
mod tenant;

use crate::config::{Command, LogArgs, LogFormat};

/// The target of the app's log lines: the binary's, as when they were logged in `main`.
const LOG_TARGET: &str = "dispatcher";

/// Logs to stderr, as text or JSON lines, filtered by `--log-filter` (`info` when the
/// filter does not parse).
pub fn init_logging(args: &LogArgs) {
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

/// Runs one command to its end. `healthcheck` is answered by [`healthcheck::run`] before
/// this, with its own exit code.
pub async fn run(command: Command) -> anyhow::Result<()> {
    install_crypto_provider();
    match command {
        Command::Serve(args) => serve::serve(*args).await,
        Command::Healthcheck(_) => Ok(()), // answered in `main`, before logging matters
        Command::Migrate(database) => tenant::migrate(&database).await,
        Command::Tenant(command) => tenant::run(command).await,
    }
}

/// Makes ring rustls' process-wide provider, the one kube-rs and sqlx name for themselves:
/// redis-rs asks rustls for the default, which must be installed before the first `rediss://`
/// connection (rustls would otherwise pick one from its crate features, and panic if more
/// than one were compiled in).
fn install_crypto_provider() {
    // Err means a provider is installed already: nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
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

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_the_password_only() {
        for (url, shown) in [
            (
                "postgres://agent:s3cret@db:5432/agent_bus",
                "postgres://agent:***@db:5432/agent_bus",
            ),
            ("redis://:s3cret@redis:6379", "redis://:***@redis:6379"),
            // A password holding '@' or ':' is hidden whole.
            ("postgres://u:p@ss:w@db/x", "postgres://u:***@db/x"),
            (
                "postgres://agent@db/agent_bus",
                "postgres://agent@db/agent_bus",
            ),
            ("redis://redis:6379", "redis://redis:6379"),
            ("sqlite://agent-bus.db", "sqlite://agent-bus.db"),
            ("not a url @ all", "not a url @ all"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }
}
