//! Whether the database keeps what it acknowledges. A commit the dispatcher was told
//! succeeded is a promise to a user (a 201 for a submit, a state another replica acts
//! on); a server that acknowledges commits before they reach its log can lose them in a
//! crash. The dispatcher does not refuse such a server (tests and throwaway installs run
//! one on purpose), it says so at start: [`Store::durability_risks`] reads the settings.
//!
//! Invariant: a risk is reported only from a setting the server itself reports, never
//! guessed from the URL.

use std::fmt;

use super::{Backend, During, Result, Store};

/// A database setting under which an acknowledged commit can be lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurabilityRisk {
    /// PostgreSQL `synchronous_commit = off`: commits are acknowledged before their WAL
    /// is written, so a crash of PostgreSQL alone loses the last ones (up to three times
    /// `wal_writer_delay`).
    PostgresAsynchronousCommit,
    /// PostgreSQL `fsync = off`: the WAL reaches the operating system but is never
    /// flushed; a process crash loses nothing, a machine crash or power loss can lose
    /// commits and corrupt the database.
    PostgresNoFsync,
    /// SQLite `PRAGMA synchronous = OFF`: commits are handed to the operating system
    /// without a flush; a machine crash can lose them.
    SqliteNoSync,
}

impl DurabilityRisk {
    /// The setting, as the database names it.
    #[must_use]
    pub fn setting(&self) -> &'static str {
        match self {
            Self::PostgresAsynchronousCommit => "synchronous_commit = off",
            Self::PostgresNoFsync => "fsync = off",
            Self::SqliteNoSync => "PRAGMA synchronous = OFF",
        }
    }
}

impl fmt::Display for DurabilityRisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let consequence = match self {
            Self::PostgresAsynchronousCommit => {
                "the server acknowledges commits before they are durable: a crash of PostgreSQL \
                 loses the last acknowledged tasks and state changes"
            }
            Self::PostgresNoFsync => {
                "the server never flushes its log to disk: a machine crash or power loss can \
                 lose acknowledged commits and corrupt the database"
            }
            Self::SqliteNoSync => {
                "commits are not flushed to disk: a machine crash or power loss can lose \
                 acknowledged commits"
            }
        };
        write!(f, "{}: {consequence}", self.setting())
    }
}

impl Store {
    /// The settings of the database under which an acknowledged commit can be lost; empty
    /// when commits are durable.
    pub async fn durability_risks(&self) -> Result<Vec<DurabilityRisk>> {
        let during = || "reading the database's durability settings".to_owned();
        let mut risks = Vec::new();
        match self.backend {
            Backend::Postgres => {
                let (synchronous_commit, fsync): (String, String) = sqlx::query_as(
                    "SELECT current_setting('synchronous_commit'), current_setting('fsync')",
                )
                .fetch_one(&self.pool)
                .await
                .during(during)?;
                if synchronous_commit.eq_ignore_ascii_case("off") {
                    risks.push(DurabilityRisk::PostgresAsynchronousCommit);
                }
                if fsync.eq_ignore_ascii_case("off") {
                    risks.push(DurabilityRisk::PostgresNoFsync);
                }
            }
            Backend::Sqlite => {
                // Each connection has its own setting; the pool's `after_connect` sets
                // none, so any connection answers for all.
                let (synchronous,): (i64,) = sqlx::query_as("PRAGMA synchronous")
                    .fetch_one(&self.pool)
                    .await
                    .during(during)?;
                if synchronous == 0 {
                    risks.push(DurabilityRisk::SqliteNoSync);
                }
            }
        }
        Ok(risks)
    }
}
