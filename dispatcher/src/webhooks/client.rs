//! The HTTP side of deliveries, with the destination rules of
//! [`crate::task::webhook`] enforced where the connection is made: the URL is checked,
//! the host resolved and its addresses checked before anything is sent, and the client
//! connects only to addresses its own resolver checked again ([`GuardedResolver`]), so a
//! second answer of the name's DNS (rebinding) cannot lead it elsewhere. No redirects
//! are followed (hyper's client follows none), no proxy is used, timeouts are short and
//! the answer's body is not read.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;

use crate::task::webhook::{Destinations, check_url};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connector = hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>;

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

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let destinations = self.destinations.clone();
        Box::pin(async move {
            let allowed = allowed_addresses(&destinations, name.as_str(), 0).await?;
            Ok(allowed.into_iter())
        })
    }
}

/// The addresses of `host` deliveries may connect to; a [`Refused`] error when it has
/// none (a lookup failure is an I/O error: worth another try).
async fn allowed_addresses(
    destinations: &Destinations,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, BoxError> {
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
    http: HyperClient<Connector, Full<Bytes>>,
    destinations: Arc<Destinations>,
    timeout: Duration,
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
    /// most half of it). TLS is rustls (ring) trusting the Mozilla roots and
    /// `extra_roots`.
    pub fn new(
        destinations: Destinations,
        timeout: Duration,
        extra_roots: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Self, rustls::Error> {
        let destinations = Arc::new(destinations);
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for root in extra_roots {
            roots.add(root.clone())?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new_with_resolver(GuardedResolver {
            destinations: destinations.clone(),
        });
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout / 2));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http = HyperClient::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            http,
            destinations,
            timeout,
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
        if host.parse::<std::net::IpAddr>().is_err() {
            let lookup = tokio::time::timeout(
                self.timeout,
                allowed_addresses(&self.destinations, &host, 0),
            )
            .await;
            let failed = match lookup {
                Ok(Ok(_)) => None,
                Ok(Err(error)) => Some(error),
                Err(_) => Some(format!("resolving {host} timed out").into()),
            };
            if let Some(error) = failed {
                return match error.downcast::<Refused>() {
                    Ok(refused) => Outcome::Refused(refused.0),
                    Err(error) => Outcome::Failed {
                        status: None,
                        error: format!("resolving {host}: {error}"),
                    },
                };
            }
        }
        let built = http::Request::post(request.url)
            .header("content-type", "application/json")
            .header(
                "user-agent",
                concat!("agent-bus-webhooks/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", request.id)
            .header("webhook-timestamp", request.timestamp.to_string())
            .header("webhook-signature", request.signature)
            .body(Full::new(Bytes::from(request.body.to_owned())));
        let built = match built {
            Ok(built) => built,
            Err(error) => return Outcome::Refused(format!("destination refused: {error}")),
        };
        match tokio::time::timeout(self.timeout, self.http.request(built)).await {
            Err(_) => Outcome::Failed {
                status: None,
                error: format!("no answer within {}s", self.timeout.as_secs()),
            },
            // The body is never read: dropping the answer closes the connection.
            Ok(Ok(answer)) if answer.status().is_success() => Outcome::Delivered {
                status: answer.status().as_u16(),
            },
            Ok(Ok(answer)) => {
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
            Ok(Err(error)) => match refusal_in(&error) {
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

/// `error` with its causes, on one line, at most 500 characters.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        text.push_str(": ");
        text.push_str(&current.to_string());
        cause = current.source();
    }
    text.chars().take(500).collect()
}
