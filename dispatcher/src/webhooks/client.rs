//! The HTTP side of deliveries, with the destination rules of
//! [`crate::task::webhook`] enforced where the connection is made: the URL is checked,
//! the host resolved and its addresses checked before anything is sent, and the client
//! connects only to addresses its own resolver checked again ([`GuardedResolver`]), so a
//! second answer of the name's DNS (rebinding) cannot lead it elsewhere. No redirects
//! are followed, no proxy is used, timeouts are short and the answer's body is not read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::task::webhook::{Destinations, check_url};

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Delivered { status: u16 },
    /// Worth another try: an answer other than 2xx, or a transport error.
    Failed { status: Option<u16>, error: String },
    /// The destination is refused (scheme, host or address): never worth another try.
    Refused(String),
}

/// A destination refused when resolving.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Resolves names with the system resolver and hands the connector only the addresses
/// the destination rules allow.
#[derive(Debug, Clone)]
struct GuardedResolver {
    destinations: Arc<Destinations>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let destinations = self.destinations.clone();
        Box::pin(async move {
            let allowed = allowed_addresses(&destinations, name.as_str(), 0).await?;
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The addresses of `host` deliveries may connect to; a [`Refused`] error when it has
/// none (a lookup failure is an I/O error: worth another try).
async fn allowed_addresses(
    destinations: &Destinations,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    let mut refusal = None;
    let mut allowed = Vec::new();
    for address in tokio::net::lookup_host((host, port)).await? {
        match destinations.check_address(address.ip()) {
            Ok(()) => allowed.push(address),
            Err(why) => refusal = refusal.or(Some(why)),
        }
    }
    match (allowed.is_empty(), refusal) {
        (true, Some(why)) => Err(Box::new(Refused(format!(
            "destination refused: {host} resolves to {why}"
        )))),
        (true, None) => Err(format!("{host} resolves to no address").into()),
        (false, _) => Ok(allowed),
    }
}

/// Sends deliveries. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    destinations: Arc<Destinations>,
}

/// How a delivery is sent: the signed headers and the body.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub url: &'a str,
    pub id: &'a str,
    pub timestamp: i64,
    pub signature: &'a str,
    pub body: &'a str,
}

impl Client {
    /// A client for `destinations` whose requests take at most `timeout` (connecting at
    /// most half of it). TLS is rustls (ring) trusting the Mozilla roots.
    pub fn new(destinations: Destinations, timeout: Duration) -> Result<Self, reqwest::Error> {
        let destinations = Arc::new(destinations);
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth());
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout / 2)
            .user_agent(concat!("agent-bus-webhooks/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(GuardedResolver {
                destinations: destinations.clone(),
            }));
        if let Ok(tls) = tls {
            builder = builder.tls_backend_preconfigured(tls);
        }
        Ok(Self {
            http: builder.build()?,
            destinations,
        })
    }

    /// Sends `request` once.
    pub async fn send(&self, request: Request<'_>) -> (Outcome, Duration) {
        let started = Instant::now();
        let outcome = self.attempt(request).await;
        (outcome, started.elapsed())
    }

    async fn attempt(&self, request: Request<'_>) -> Outcome {
        let host = match check_url(request.url, &self.destinations) {
            Ok(host) => host,
            Err(why) => return Outcome::Refused(format!("destination refused: {why}")),
        };
        // Names are checked here too, so that a refused one is a refusal (recorded, not
        // retried) rather than a connection error; the resolver checks again what the
        // connection really uses.
        if host.parse::<std::net::IpAddr>().is_err()
            && let Err(error) = allowed_addresses(&self.destinations, &host, 0).await
        {
            return match error.downcast::<Refused>() {
                Ok(refused) => Outcome::Refused(refused.0),
                Err(error) => Outcome::Failed {
                    status: None,
                    error: format!("resolving {host}: {error}"),
                },
            };
        }
        let sent = self
            .http
            .post(request.url)
            .header("content-type", "application/json")
            .header("webhook-id", request.id)
            .header("webhook-timestamp", request.timestamp.to_string())
            .header("webhook-signature", request.signature)
            .body(request.body.to_owned())
            .send()
            .await;
        match sent {
            // The body is never read: dropping the answer closes the connection.
            Ok(answer) if answer.status().is_success() => Outcome::Delivered {
                status: answer.status().as_u16(),
            },
            Ok(answer) => {
                let status = answer.status();
                let error = if status.is_redirection() {
                    format!("answered {status} (redirects are not followed)")
                } else {
                    format!("answered {status}")
                };
                Outcome::Failed {
                    status: Some(status.as_u16()),
                    error,
                }
            }
            Err(error) => match refusal_in(&error) {
                Some(why) => Outcome::Refused(why),
                None => Outcome::Failed {
                    status: None,
                    error: describe(&error),
                },
            },
        }
    }
}

/// The resolver's refusal among the causes of `error`, if that is why it failed.
fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(refused) = current.downcast_ref::<Refused>() {
            return Some(refused.0.clone());
        }
        cause = current.source();
    }
    None
}

/// `error` with its causes, on one line (reqwest's own message is only "error sending
/// request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else {
        error.to_string()
    };
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        text.push_str(": ");
        text.push_str(&current.to_string());
        cause = current.source();
    }
    text.chars().take(500).collect()
}
