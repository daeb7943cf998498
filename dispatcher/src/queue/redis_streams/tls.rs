//! TLS to Redis (`rediss://`), always with the server's certificate checked: against the
//! CA file the operator gives, else the Mozilla roots built in (webpki-roots), and for the
//! URL's host. redis-rs is built without `tls-rustls-insecure`, and `#insecure` is refused
//! here before it could reach it.

use std::sync::Arc;

use redis::{Client, ConnectionAddr, IntoConnectionInfo as _, TlsCertificates};

use crate::queue::{QueueError, Result};

/// The client for `url`, trusting `ca_pem` (one or more PEM certificates) when given.
pub(super) fn client(url: &str, ca_pem: Option<Vec<u8>>) -> Result<Client> {
    let info = url
        .into_connection_info()
        .map_err(|source| QueueError::InvalidUrl { source })?;
    if matches!(info.addr(), ConnectionAddr::TcpTls { insecure: true, .. }) {
        return Err(QueueError::InsecureTls);
    }
    match ca_pem {
        None => Client::open(info).map_err(|source| QueueError::InvalidUrl { source }),
        Some(pem) => Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            },
        )
        .map_err(|source| QueueError::TlsSettings { source }),
    }
}

/// A failed first contact said in TLS terms when the handshake is what failed (rustls'
/// error somewhere among its causes), else unchanged.
pub(super) fn explained(error: QueueError) -> QueueError {
    if let QueueError::Unavailable { source, .. } = &error
        && let Some(tls) = rustls_cause(source)
    {
        return QueueError::Tls {
            detail: tls.to_string(),
        };
    }
    error
}

/// rustls' error among the causes of `error`. redis-rs keeps an I/O error behind an `Arc`
/// and `io::Error` keeps its cause behind `get_ref` (its `source` skips it), so both are
/// looked into as well as `source`.
fn rustls_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = error.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(shared) = error.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
        return rustls_cause(shared.as_ref());
    }
    if let Some(io) = error.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
    {
        return rustls_cause(inner);
    }
    error.source().and_then(rustls_cause)
}
