//! An isolated Redis key space per test: a unique key prefix on the server in
//! `REDIS_URL`, whose keys are deleted afterwards.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use redis::AsyncCommands as _;
use redis::aio::MultiplexedConnection;

use crate::{EnvError, env_var, unique_suffix};

/// A key prefix that belongs to one test.
#[derive(Debug, Clone)]
pub struct RedisKeySpace {
    /// The server's URL.
    pub url: String,
    /// Every key of the test starts with this (`test:<random>:`).
    pub prefix: String,
}

impl RedisKeySpace {
    /// A new prefix on the server of `REDIS_URL`; checks that the server answers.
    pub async fn create() -> Result<Self, EnvError> {
        let url = env_var("REDIS_URL")?;
        let space = Self {
            prefix: format!("test:{}:", unique_suffix()),
            url,
        };
        let mut connection = space.connection().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .map_err(|source| EnvError::Redis {
                url: space.url.clone(),
                source,
            })?;
        Ok(space)
    }

    /// `name` inside this key space.
    #[must_use]
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A new connection to the server.
    pub async fn connection(&self) -> Result<MultiplexedConnection, EnvError> {
        let redis_err = |source| EnvError::Redis {
            url: self.url.clone(),
            source,
        };
        let client = redis::Client::open(self.url.as_str()).map_err(redis_err)?;
        client
            .get_multiplexed_async_connection()
            .await
            .map_err(redis_err)
    }

    /// The keys currently in this key space.
    pub async fn keys(&self) -> Result<Vec<String>, EnvError> {
        let mut connection = self.connection().await?;
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .map_err(|source| EnvError::Redis {
                    url: self.url.clone(),
                    source,
                })?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// Deletes every key of this key space.
    pub async fn clear(&self) -> Result<(), EnvError> {
        let keys = self.keys().await?;
        if keys.is_empty() {
            return Ok(());
        }
        let mut connection = self.connection().await?;
        let _: usize = connection
            .del(keys)
            .await
            .map_err(|source| EnvError::Redis {
                url: self.url.clone(),
                source,
            })?;
        Ok(())
    }
}

/// Runs `body` with a fresh key space and deletes its keys afterwards, whatever the outcome.
pub async fn with_redis_keyspace<F, Fut, T>(body: F) -> T
where
    F: FnOnce(RedisKeySpace) -> Fut,
    Fut: Future<Output = T>,
{
    let space = RedisKeySpace::create()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let outcome = AssertUnwindSafe(body(space.clone())).catch_unwind().await;
    if let Err(e) = space.clear().await {
        eprintln!("warning: clearing redis key space {}: {e}", space.prefix);
    }
    match outcome {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
