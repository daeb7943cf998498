//! What the store and the queue share about TLS to their datastores: finding rustls' own
//! error among the causes of a failed connection, so that a certificate the settings do
//! not trust is reported as that (and not as a passing outage). Both clients speak TLS
//! through rustls with the ring provider (see docs/TLS.md).

use std::error::Error;
use std::sync::Arc;

/// rustls' error among the causes of `error`, if the TLS handshake is what failed.
/// `io::Error` keeps its cause behind `get_ref` (its `source` skips it) and redis-rs keeps
/// an I/O error behind an `Arc`, so both are looked into as well as `source`.
pub(crate) fn rustls_cause<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = error.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(shared) = error.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
        return rustls_cause(shared.as_ref());
    }
    if let Some(io) = error.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
    {
        return rustls_cause(inner);
    }
    error.source().and_then(rustls_cause)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::rustls_cause;

    #[test]
    fn finds_rustls_behind_io_errors_and_arcs() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls.clone());
        assert_eq!(rustls_cause(&io), Some(&tls));
        let shared: Arc<dyn std::error::Error + Send + Sync> = Arc::new(io);
        assert_eq!(rustls_cause(&shared), Some(&tls));
        let other = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(rustls_cause(&other), None);
    }
}
