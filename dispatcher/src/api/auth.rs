//! Bearer API keys: a key is shown once, at `dispatcher tenant create` or `tenant
//! rotate-key`; only its SHA-256 is stored, and every request's key is hashed and looked
//! up, with no cache: a replaced key gets 401 and a disabled tenant 403 from the next
//! request on.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::store::Tenant;

/// Prefix of every key, so leaked keys are recognisable by secret scanners.
const KEY_PREFIX: &str = "ab_";

/// A new random API key: the prefix and 64 hex digits (256 bits from the OS generator),
/// as a secret (zeroed when dropped, never printed by `Debug`).
#[must_use]
pub fn new_api_key() -> SecretString {
    let bytes: [u8; 32] = rand::random();
    SecretString::from(format!("{KEY_PREFIX}{}", hex::encode(bytes)))
}

/// The stored form of a key.
#[must_use]
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The credential of an `Authorization: Bearer …` header, trimmed; `None` when there is
/// none or it is empty. The scheme is matched case-insensitively (`bearer`, `BEARER`), as
/// RFC 9110 section 11.1 says. Tenant keys and runner report tokens both travel this way.
/// Hand-written (five lines) rather than the `headers` crate's `Authorization<Bearer>`,
/// which would bring `headers` and `axum-extra` into the build for this one split
/// (docs/adr/0006-maintained-crates-and-what-we-keep.md).
pub(super) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The tenant whose key the request carries.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Tenant);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer_token(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let tenant = state
            .store()
            .tenant_by_key_hash(&hash_api_key(key))
            .await?
            .ok_or(ApiError::Unauthorized)?;
        // Every log line of the request names its tenant.
        tracing::Span::current().record("tenant", tenant.name.as_str());
        if tenant.disabled_at.is_some() {
            return Err(ApiError::TenantDisabled {
                tenant: tenant.name,
            });
        }
        Ok(Self(tenant))
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use axum::http::{HeaderMap, HeaderValue, header::AUTHORIZATION};

    use super::{bearer_token, hash_api_key, new_api_key};

    fn with_authorization(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer ab_x",
            "bearer ab_x",
            "BEARER ab_x",
            "bEaReR   ab_x  ",
        ] {
            assert_eq!(
                bearer_token(&with_authorization(value)),
                Some("ab_x"),
                "{value}"
            );
        }
        for value in [
            "Basic ab_x",
            "Bearer",
            "Bearer ",
            "Bearerab_x",
            "Bearer    ",
            "ab_x",
        ] {
            assert_eq!(bearer_token(&with_authorization(value)), None, "{value}");
        }
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn keys_are_random_and_hashes_stable() {
        let (a, b) = (new_api_key(), new_api_key());
        assert_eq!(format!("{a:?}"), "SecretBox<str>([REDACTED])");
        let (a, b) = (a.expose_secret(), b.expose_secret());
        assert_ne!(a, b);
        assert!(a.starts_with("ab_") && a.len() == 67);
        assert_eq!(hash_api_key(a), hash_api_key(a));
        assert_ne!(hash_api_key(a), hash_api_key(b));
        assert_eq!(hash_api_key("x").len(), 64);
    }
}
