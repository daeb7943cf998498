//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): a tenant's secret
//! is `whsec_` and the base64 of random bytes; a delivery's `webhook-signature` is
//! `v1,` and the base64 of HMAC-SHA256, keyed with the secret's decoded bytes, of
//! `"{webhook-id}.{webhook-timestamp}.{body}"`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// What every secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";

/// Random bytes in a new secret (the specification asks for 24 to 64).
const SECRET_BYTES: usize = 32;

/// A stored secret that cannot sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a webhook secret must start with '{SECRET_PREFIX}'")]
    Prefix,
    #[error("a webhook secret's key is not base64: {0}")]
    Base64(String),
    #[error("a webhook secret's key must be 24 to 64 bytes, it is {0}")]
    Length(usize),
}

/// A new secret: `whsec_` and the base64 of 32 random bytes.
#[must_use]
pub fn new_secret() -> String {
    let bytes: [u8; SECRET_BYTES] = rand::random();
    format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes))
}

/// The key a secret signs with: its base64 part, decoded.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::Prefix)?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|e| SecretError::Base64(e.to_string()))?;
    if !(24..=64).contains(&key.len()) {
        return Err(SecretError::Length(key.len()));
    }
    Ok(key)
}

/// The `webhook-signature` header of the delivery `id` sent at `timestamp` (unix seconds)
/// with `body`.
#[must_use]
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::{SecretError, new_secret, secret_key, signature};

    /// The vector of the Standard Webhooks reference libraries' tests (and Svix's).
    #[test]
    fn signs_the_reference_vector() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            signature(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn new_secrets_have_32_random_bytes() {
        let (one, two) = (new_secret(), new_secret());
        assert_ne!(one, two);
        assert!(one.starts_with("whsec_"));
        assert_eq!(secret_key(&one).unwrap().len(), 32);
        assert_eq!(secret_key("whs_abc"), Err(SecretError::Prefix));
        assert!(matches!(
            secret_key("whsec_!!"),
            Err(SecretError::Base64(_))
        ));
        assert_eq!(secret_key("whsec_AAAA"), Err(SecretError::Length(3)));
    }
}
