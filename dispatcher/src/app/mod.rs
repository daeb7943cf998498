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

use anyhow::Context as _;
use secrecy::ExposeSecret as _;

use crate::config::{Command, DatabaseArgs, LogArgs, LogFormat};
use crate::store::Store;

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
        Command::Serve(args) => Box::pin(serve::serve(*args)).await,
        Command::Healthcheck(_) => Ok(()), // answered in `main`, before logging matters
        Command::Migrate(database) => tenant::migrate(&database).await,
        Command::Tenant(command) => tenant::run(command).await,
        Command::Openapi => {
            let limits = crate::task::submission::Limits::default();
            let text = crate::api::openapi::document_text(&limits)
                .context("rendering the OpenAPI document")?;
            print!("{text}");
            Ok(())
        }
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

/// The store `database` names, migrated; the error names the database without its
/// password. What `serve`, `migrate` and the `tenant` commands open.
async fn open_store(database: &DatabaseArgs) -> anyhow::Result<Store> {
    let url = database.database_url.expose_secret();
    let limits = crate::store::SessionLimits {
        statement_timeout: database.database_statement_timeout,
        lock_timeout: database.database_lock_timeout,
    };
    let store = Store::connect_with(url, database.database_max_connections, limits)
        .await
        .with_context(|| format!("connecting to the database {}", redact_url(url)))?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// Query parameters of a database or Redis URL whose value is a secret.
const SECRET_PARAMETERS: [&str; 4] = ["password", "sslpassword", "pass", "token"];

/// `url` without its secrets, for logs and errors: the password of its user part and
/// the values of password-like query parameters become `***`. A text that does not parse
/// as a URL keeps only its scheme and what follows its last '@', or nothing.
fn redact_url(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return match (text.split_once("://"), text.rsplit_once('@')) {
            (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
            (Some((scheme, _)), None) => format!("{scheme}://…"),
            _ => "(not a url)".to_owned(),
        };
    };
    if url.password().is_some() {
        // Fails only for URLs that cannot have a user part, which then has no password.
        let _ = url.set_password(Some("***"));
    }
    let secret = |name: &str| SECRET_PARAMETERS.contains(&name.to_ascii_lowercase().as_str());
    if url.query_pairs().any(|(name, _)| secret(&name)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(name, value)| {
                let value = if secret(&name) {
                    "***".to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redact_url_hides_passwords_only() {
        for (url, shown) in [
            (
                "postgres://agent:s3cret@db:5432/agent_bus",
                "postgres://agent:***@db:5432/agent_bus",
            ),
            ("redis://:s3cret@redis:6379", "redis://:***@redis:6379"),
            (
                "rediss://default:s3cret@redis:6380/0",
                "rediss://default:***@redis:6380/0",
            ),
            // A password holding '@' or ':' is hidden whole.
            ("postgres://u:p@ss:w@db/x", "postgres://u:***@db/x"),
            (
                "postgres://agent@db/agent_bus?password=s3cret&sslmode=verify-full",
                "postgres://agent@db/agent_bus?password=***&sslmode=verify-full",
            ),
            (
                "postgres://agent@db/agent_bus",
                "postgres://agent@db/agent_bus",
            ),
            ("redis://redis:6379", "redis://redis:6379"),
            ("sqlite://agent-bus.db", "sqlite://agent-bus.db"),
            ("not a url @ s3cret", "(not a url)"),
            ("postgres://u:s3cret@[bad/x", "postgres://***@[bad/x"),
        ] {
            let redacted = redact_url(url);
            assert_eq!(redacted, shown, "{url}");
            assert!(!redacted.contains("s3cret"), "{url}");
        }
    }
}
