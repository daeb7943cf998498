//! The Redis Streams backend's connections: one shared multiplexed connection for
//! commands, a small pool of connections for blocking reads (a blocked read must not stall
//! other callers' commands), and the errors that make a connection be dropped and opened
//! again.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisResult,
    ServerErrorKind,
};

use super::{COMMAND_TIMEOUT, CONNECT_TIMEOUT, IDLE_BLOCKING_CONNECTIONS, RedisQueue, lock};
use crate::queue::{QueueError, Result};

impl RedisQueue {
    pub(super) async fn command_connection(&self) -> Result<MultiplexedConnection> {
        if let Some(connection) = lock(&self.inner.commands).clone() {
            return Ok(connection);
        }
        let connection = self.open(COMMAND_TIMEOUT).await?;
        *lock(&self.inner.commands) = Some(connection.clone());
        Ok(connection)
    }

    pub(super) async fn blocking_connection(&self) -> Result<MultiplexedConnection> {
        let idle = lock(&self.inner.blocking).pop();
        match idle {
            Some(connection) => Ok(connection),
            None => self.open(COMMAND_TIMEOUT).await,
        }
    }

    /// Keeps a blocking-read connection for reuse. A connection whose read was cancelled
    /// is never returned (its pending reply would delay the next read), only dropped.
    pub(super) fn return_blocking_connection(&self, connection: MultiplexedConnection) {
        let mut idle = lock(&self.inner.blocking);
        if idle.len() < IDLE_BLOCKING_CONNECTIONS {
            idle.push(connection);
        }
    }

    pub(super) async fn open(&self, response_timeout: Duration) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        self.inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|source| QueueError::Unavailable {
                operation: "connect",
                source,
            })
    }

    /// Runs `cmd` on the command connection; `Err` only when no connection could be had,
    /// the inner result is Redis's answer.
    pub(super) async fn query_raw<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<RedisResult<T>> {
        let mut connection = self.command_connection().await?;
        Ok(cmd.query_async(&mut connection).await)
    }

    pub(super) async fn pipe_raw<T: FromRedisValue>(
        &self,
        pipe: &Pipeline,
    ) -> Result<RedisResult<T>> {
        let mut connection = self.command_connection().await?;
        Ok(pipe.query_async(&mut connection).await)
    }

    pub(super) async fn query<T: FromRedisValue>(
        &self,
        operation: &'static str,
        key: &str,
        cmd: &Cmd,
    ) -> Result<T> {
        self.query_raw(cmd)
            .await?
            .map_err(|source| self.failure(operation, key, source))
    }

    /// The error for a failed command; forgets the command connection when it broke.
    pub(super) fn failure(
        &self,
        operation: &'static str,
        key: &str,
        source: RedisError,
    ) -> QueueError {
        if is_unavailable(&source) {
            *lock(&self.inner.commands) = None;
            QueueError::Unavailable { operation, source }
        } else {
            QueueError::Command {
                operation,
                key: key.to_owned(),
                source,
            }
        }
    }
}

/// The server could not be reached, did not answer in time, or cannot serve the queue
/// now; retrying later, on a new connection, may work. `READONLY` is a primary demoted
/// to a replica (a failover): the address may lead to the new primary once the
/// connection is opened again, so it is dropped like a broken one. `LOADING` is a server
/// still reading its data after a restart.
pub(super) fn is_unavailable(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                )
        )
}
