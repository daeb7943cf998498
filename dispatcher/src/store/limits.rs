//! How long one PostgreSQL statement may run and wait for a lock. A statement stuck
//! behind a lock or a slow plan holds a pool connection, and with it every request queued
//! behind; with these limits the server cancels it and the request gets a 503 it can
//! retry, so one bad query cannot starve the pool.
//!
//! The limits are session defaults given at connection start (the `options` startup
//! parameter), so `RESET` returns to them; migrations lift them on their own session.

use std::time::Duration;

use super::{Result, StoreError};

/// Lifts both limits for the session (migrations).
pub(super) const UNLIMITED: &str = "SET statement_timeout = 0; SET lock_timeout = 0";
/// Back to the limits the session started with.
pub(super) const AS_STARTED: &str = "RESET statement_timeout; RESET lock_timeout";

/// The statement and lock timeouts of every session; zero is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
}

impl SessionLimits {
    /// No limits: the server's own settings apply (tools and tests).
    pub const NONE: Self = Self {
        statement_timeout: Duration::ZERO,
        lock_timeout: Duration::ZERO,
    };

    /// The settings as `-c name=value` options, in milliseconds; empty for no limit.
    fn options(self) -> Vec<String> {
        [
            ("statement_timeout", self.statement_timeout),
            ("lock_timeout", self.lock_timeout),
        ]
        .into_iter()
        .filter(|(_, limit)| !limit.is_zero())
        .map(|(name, limit)| format!("-c {name}={}", limit.as_millis()))
        .collect()
    }

    /// `url` with the limits added to its `options` parameter (after any it has, which
    /// they override: a later `-c` wins).
    pub(super) fn in_url(self, url: &str) -> Result<String> {
        let options = self.options();
        if options.is_empty() {
            return Ok(url.to_owned());
        }
        let mut parsed = url::Url::parse(url).map_err(|_| StoreError::InvalidUrl {
            source: sqlx::Error::Configuration("the database URL does not parse".into()),
        })?;
        let mut pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect();
        let mut merged = options.join(" ");
        if let Some(index) = pairs.iter().position(|(name, _)| name == "options") {
            let (_, given) = pairs.remove(index);
            merged = format!("{given} {merged}");
        }
        pairs.push(("options".to_owned(), merged));
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
        Ok(parsed.into())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::SessionLimits;

    const LIMITS: SessionLimits = SessionLimits {
        statement_timeout: Duration::from_secs(30),
        lock_timeout: Duration::from_millis(1500),
    };

    #[test]
    fn the_limits_become_startup_options_after_the_urls_own() {
        assert_eq!(
            LIMITS.in_url("postgres://u@h:5432/db").unwrap(),
            "postgres://u@h:5432/db?options=-c+statement_timeout%3D30000+-c+lock_timeout%3D1500"
        );
        assert_eq!(
            LIMITS
                .in_url("postgres://u@h/db?sslmode=verify-full&options=-c%20search_path%3Dx")
                .unwrap(),
            "postgres://u@h/db?sslmode=verify-full&options=-c+search_path%3Dx+-c+statement_timeout%3D30000+-c+lock_timeout%3D1500"
        );
    }

    #[test]
    fn no_limits_leave_the_url_as_it_is() {
        let url = "postgres://u:p%40ss@h/db?sslmode=disable";
        assert_eq!(SessionLimits::NONE.in_url(url).unwrap(), url);
        let only_locks = SessionLimits {
            statement_timeout: Duration::ZERO,
            ..LIMITS
        };
        assert_eq!(
            only_locks.in_url("postgres://h/db").unwrap(),
            "postgres://h/db?options=-c+lock_timeout%3D1500"
        );
    }
}
