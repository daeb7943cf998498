//! Report tokens: `abr1.<task>.<attempt>.<expiry>.<mac>`, where `<mac>` is the
//! HMAC-SHA256 of everything before it under a key all replicas share. A runner can only
//! speak for its own task attempt, and only until the token expires.
//!
//! Invariants: verification is constant-time in the MAC; a token whose MAC is right but
//! which names another task or attempt is [`TokenError::WrongTask`] (403), anything
//! forged, damaged or expired is refused before the store is touched.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::task::TaskId;

const VERSION: &str = "abr1";

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the report token is malformed")]
    Malformed,
    #[error("the report token's signature does not match")]
    BadSignature,
    #[error("the report token expired at {0}")]
    Expired(jiff::Timestamp),
    #[error("the report token is for task {token_task} attempt {token_attempt}, not this one")]
    WrongTask {
        token_task: TaskId,
        token_attempt: u32,
    },
}

/// Mints and checks report tokens with one key.
#[derive(Clone)]
pub struct ReportTokens {
    /// The keyed MAC, cloned per use. `None` only if the key were refused, which HMAC
    /// never does (it accepts keys of any length); then every token fails to verify.
    keyed: Option<Hmac<Sha256>>,
}

impl std::fmt::Debug for ReportTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportTokens").finish_non_exhaustive()
    }
}

impl ReportTokens {
    #[must_use]
    pub fn new(key: &[u8]) -> Self {
        Self {
            keyed: Hmac::<Sha256>::new_from_slice(key).ok(),
        }
    }

    /// A token for `attempt` of task `id`, valid until `expires`.
    #[must_use]
    pub fn mint(&self, id: TaskId, attempt: u32, expires: jiff::Timestamp) -> String {
        let claims = format!(
            "{VERSION}.{}.{attempt}.{}",
            id.simple(),
            expires.as_second()
        );
        let signature = self.keyed.clone().map_or_else(String::new, |mut mac| {
            mac.update(claims.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        });
        format!("{claims}.{signature}")
    }

    /// Checks that `token` speaks for `attempt` of task `id` at `now`.
    pub fn verify(
        &self,
        token: &str,
        id: TaskId,
        attempt: u32,
        now: jiff::Timestamp,
    ) -> Result<(), TokenError> {
        let (claims, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let signature = hex::decode(signature).map_err(|_| TokenError::Malformed)?;
        let mut mac = self.keyed.clone().ok_or(TokenError::BadSignature)?;
        mac.update(claims.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        let mut parts = claims.split('.');
        let (Some(VERSION), Some(task), Some(token_attempt), Some(expires), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let token_task = uuid::Uuid::try_parse(task)
            .map(TaskId)
            .map_err(|_| TokenError::Malformed)?;
        let token_attempt: u32 = token_attempt.parse().map_err(|_| TokenError::Malformed)?;
        let expires = expires
            .parse::<i64>()
            .ok()
            .and_then(|s| jiff::Timestamp::from_second(s).ok())
            .ok_or(TokenError::Malformed)?;
        if token_task != id || token_attempt != attempt {
            return Err(TokenError::WrongTask {
                token_task,
                token_attempt,
            });
        }
        if now > expires {
            return Err(TokenError::Expired(expires));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{ReportTokens, TokenError};
    use crate::task::TaskId;

    fn at(second: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn a_token_speaks_for_one_attempt_until_it_expires() {
        let tokens = ReportTokens::new(b"a key of the deployment");
        let (task, other) = (TaskId::new(), TaskId::new());
        let token = tokens.mint(task, 2, at(2_000_000_000));
        assert_eq!(tokens.verify(&token, task, 2, at(1_900_000_000)), Ok(()));
        assert!(matches!(
            tokens.verify(&token, other, 2, at(1_900_000_000)),
            Err(TokenError::WrongTask {
                token_attempt: 2,
                ..
            })
        ));
        assert!(matches!(
            tokens.verify(&token, task, 3, at(1_900_000_000)),
            Err(TokenError::WrongTask { .. })
        ));
        assert!(matches!(
            tokens.verify(&token, task, 2, at(2_000_000_001)),
            Err(TokenError::Expired(_))
        ));
    }

    #[test]
    fn forged_or_damaged_tokens_are_refused() {
        let tokens = ReportTokens::new(b"key one");
        let task = TaskId::new();
        let token = tokens.mint(task, 1, at(2_000_000_000));
        let foreign = ReportTokens::new(b"key two").mint(task, 1, at(2_000_000_000));
        let now = at(1_900_000_000);
        assert_eq!(
            tokens.verify(&foreign, task, 1, now),
            Err(TokenError::BadSignature)
        );
        // Moving the expiry breaks the signature.
        let stretched = token.replace(".2000000000.", ".2100000000.");
        assert_eq!(
            tokens.verify(&stretched, task, 1, now),
            Err(TokenError::BadSignature)
        );
        for junk in [
            "",
            "abr1",
            "abr1.x.y.z.zz",
            "no-dots-at-all",
            "abr1.a.b.c.0g",
        ] {
            assert!(tokens.verify(junk, task, 1, now).is_err(), "{junk}");
        }
    }
}
