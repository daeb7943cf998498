//! TLS to Redis (`rediss://`), always with the server's certificate checked: against the
//! CA file the operator gives, else the Mozilla roots built in (webpki-roots), and for the
//! URL's host. redis-rs is built without `tls-rustls-insecure`, and `#insecure` is refused
//! here before it could reach it.

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
        && let Some(tls) = crate::tls::rustls_cause(source)
    {
        return QueueError::Tls {
            detail: tls.to_string(),
        };
    }
    error
}
