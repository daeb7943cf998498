//! The queue: orders queued tasks and wakes the launchers that take them. It owns only
//! *references* to tasks ([`QueueEntry`]: task id, queue name, priority); PostgreSQL (or
//! the SQLite file) stays the source of truth for everything else.
//!
//! Two backends behind one [`Queue`] (enum dispatch, cheap to clone):
//! - [`RedisQueue`]: Redis Streams with one consumer group per stream, for the scaled-out
//!   deployment where several launchers share the work;
//! - [`MemoryQueue`]: in-process, for the embedded single-process mode.
//!
//! Invariants:
//! - **At least once.** An entry stays in the queue from [`Queue::enqueue`] until a
//!   [`Queue::ack`] of one of its deliveries. It may be delivered more than once (handed
//!   to another consumer by [`Queue::claim_abandoned`], or redelivered after Redis lost a
//!   consumer group), so a launcher always claims the task with a compare-and-set in the
//!   store (`queued → launching`) and simply acks and skips the entry when that fails.
//! - **Losing entries is recoverable, not prevented.** Redis may lose entries (a flush, a
//!   failover without persistence, a crash between the store's commit and the enqueue);
//!   the reconciler compares the store's queued tasks with [`Queue::pending_task_ids`] and
//!   re-enqueues what is missing. The queue itself recovers from vanished streams and
//!   groups on the next call and never fails permanently.
//! - **Order.** Within the queues asked for, higher priority is delivered first and equal
//!   priority first in, first out. Redis orders by band (priority `> 0` high, `== 0`
//!   normal, `< 0` low; FIFO inside a band, so priorities 1 and 9 are equal there); the
//!   in-memory queue orders by exact priority, then FIFO. The launcher takes a delivery
//!   as a launch opportunity for its queue and band: which tenant's task gets it is its
//!   fair choice (`launcher::fair`), which may launch another task and enqueue the
//!   delivered one again.
//! - **Isolation.** Every Redis key starts with the configured key prefix.
//! - **Cancellation.** Dropping a [`Queue::receive`] future while it waits may leave an
//!   entry delivered to that consumer but never returned; [`Queue::claim_abandoned`]
//!   hands it to a live consumer once it has been idle long enough.
//!
//! Errors: [`QueueError::Unavailable`] when Redis cannot be reached, the connection broke
//! or a reply timed out (retry later; the next call reconnects);
//! [`QueueError::Command`] when Redis refused a command; [`QueueError::InvalidUrl`] for a
//! Redis URL that does not parse; [`QueueError::InsecureTls`], [`QueueError::TlsSettings`]
//! and [`QueueError::Tls`] for TLS that would skip the certificate check, cannot be set up,
//! or failed the check (`rediss://`, see docs/TLS.md); [`QueueError::InvalidReceipt`] for
//! an ack whose receipt this backend never issued. The in-memory queue only ever returns
//! the last.

mod memory;
mod redis_streams;

use std::collections::HashSet;
use std::time::Duration;

pub use memory::MemoryQueue;
pub use redis_streams::RedisQueue;

use crate::metrics::{Metrics, QueueOperation};
use crate::task::TaskId;

/// A reference to a queued task: which task, in which queue, at which priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub task_id: TaskId,
    pub queue: String,
    /// Higher runs first.
    pub priority: i32,
}

impl QueueEntry {
    /// The entry of a stored task: its queue and priority.
    #[must_use]
    pub fn of(task: &crate::task::Task) -> Self {
        Self {
            task_id: task.id,
            queue: task.spec.queue.clone(),
            priority: task.spec.priority,
        }
    }
}

/// A delivery: the entry plus what the queue needs to acknowledge it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub entry: QueueEntry,
    /// The Redis stream entry id, or an in-process token. It stays the same when the entry
    /// is claimed by another consumer, so acking any delivery of an entry removes it.
    pub receipt: String,
}

/// How full a queue is, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Entries not yet acknowledged: waiting for a launcher, or delivered and not acked.
    pub waiting: u64,
    /// Age of the oldest of them; `None` when the queue is empty.
    pub oldest_age: Option<Duration>,
}

/// What can go wrong talking to the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis could not be reached, the connection broke, or a reply timed out.
    #[error("redis unavailable during {operation}: {source}")]
    Unavailable {
        operation: &'static str,
        source: redis::RedisError,
    },
    /// Redis answered a command with an error.
    #[error("redis {operation} on '{key}' failed: {source}")]
    Command {
        operation: &'static str,
        key: String,
        source: redis::RedisError,
    },
    /// The Redis URL does not parse (the URL itself is left out: it may hold a password).
    #[error("invalid redis url: {source}")]
    InvalidUrl { source: redis::RedisError },
    /// `rediss://…#insecure`: TLS without checking the server's certificate.
    #[error(
        "a rediss:// URL ending in #insecure turns off the check of the server's \
         certificate, which agent-bus never does: remove #insecure (and give the server's \
         CA with --redis-ca-file if a private CA signed it)"
    )]
    InsecureTls,
    /// The TLS settings cannot be used: a CA file for a URL that is not `rediss://`, or a
    /// CA file that holds no certificate.
    #[error("redis TLS settings: {source}")]
    TlsSettings { source: redis::RedisError },
    /// The TLS handshake with Redis failed: its certificate is not signed by a trusted CA
    /// or does not name the URL's host. Retrying will not help until the configuration or
    /// the certificate changes.
    #[error(
        "TLS to redis failed: {detail} (the server's certificate must be signed by the CA \
         of --redis-ca-file, or by a public CA without it, and name the host of the URL)"
    )]
    Tls { detail: String },
    /// An ack with a receipt that this backend never issued.
    #[error("invalid receipt '{receipt}' for queue '{queue}': {expected}")]
    InvalidReceipt {
        receipt: String,
        queue: String,
        expected: &'static str,
    },
}

impl QueueError {
    /// Whether retrying later may succeed (the backend was unreachable or slow).
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// The queue, whichever backend holds it, counting its operations into the metrics.
/// Clones share the same connections and state.
#[derive(Debug, Clone)]
pub struct Queue {
    backend: Backend,
    metrics: Metrics,
}

/// The backends (enum dispatch: one future type per operation).
#[derive(Debug, Clone)]
enum Backend {
    Redis(RedisQueue),
    Memory(MemoryQueue),
}

impl From<RedisQueue> for Queue {
    fn from(queue: RedisQueue) -> Self {
        Self {
            backend: Backend::Redis(queue),
            metrics: Metrics::default(),
        }
    }
}

impl From<MemoryQueue> for Queue {
    fn from(queue: MemoryQueue) -> Self {
        Self {
            backend: Backend::Memory(queue),
            metrics: Metrics::default(),
        }
    }
}

impl Queue {
    /// This queue, counting into `metrics`.
    #[must_use]
    pub fn observed(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Whether the in-process backend holds the queue.
    #[must_use]
    pub fn is_in_process(&self) -> bool {
        matches!(self.backend, Backend::Memory(_))
    }

    async fn timed<T>(
        &self,
        operation: QueueOperation,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.metrics
            .queue_operation(operation, result.is_ok(), started.elapsed());
        result
    }

    /// Adds `entry` to the end of its queue (and priority band).
    pub async fn enqueue(&self, entry: &QueueEntry) -> Result<()> {
        self.timed(QueueOperation::Enqueue, async {
            match &self.backend {
                Backend::Redis(queue) => queue.enqueue(entry).await,
                Backend::Memory(queue) => {
                    queue.enqueue(entry);
                    Ok(())
                }
            }
        })
        .await
    }

    /// Up to `max` deliveries for consumer `consumer` from the named queues, highest
    /// priority band first; waits up to `block` when nothing is ready, then returns an
    /// empty Vec. `max == 0` returns at once.
    pub async fn receive(
        &self,
        queues: &[String],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>> {
        self.timed(QueueOperation::Receive, async {
            match &self.backend {
                Backend::Redis(queue) => queue.receive(queues, consumer, max, block).await,
                Backend::Memory(queue) => queue.receive(queues, consumer, max, block).await,
            }
        })
        .await
    }

    /// Removes the delivered entry from the queue. Acking twice, or acking an entry that
    /// another consumer already acked, is harmless.
    pub async fn ack(&self, delivery: &Delivery) -> Result<()> {
        self.ack_all(std::slice::from_ref(delivery)).await
    }

    /// Acknowledges `deliveries` at once (Redis: one atomic pipeline); nothing is
    /// acknowledged when one receipt is not this queue's.
    pub async fn ack_all(&self, deliveries: &[Delivery]) -> Result<()> {
        self.timed(QueueOperation::Ack, async {
            match &self.backend {
                Backend::Redis(queue) => queue.ack(deliveries).await,
                Backend::Memory(queue) => queue.ack(deliveries),
            }
        })
        .await
    }

    /// Entries delivered to a consumer that has not acked them for `idle` are handed to
    /// `consumer` (Redis: XAUTOCLAIM), up to `max`, highest priority band first.
    pub async fn claim_abandoned(
        &self,
        queues: &[String],
        consumer: &str,
        idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>> {
        self.timed(QueueOperation::Reclaim, async {
            match &self.backend {
                Backend::Redis(queue) => queue.claim_abandoned(queues, consumer, idle, max).await,
                Backend::Memory(queue) => Ok(queue.claim_abandoned(queues, consumer, idle, max)),
            }
        })
        .await
    }

    /// Forgets the consumers of `queues` other than `consumer` that hold no delivery and
    /// have not read for `idle` (Redis: XGROUP DELCONSUMER): every launcher that ever ran
    /// left one, and Redis keeps them, listed by every XINFO, forever. A live consumer
    /// that was forgotten is made again by its next read. The number forgotten.
    pub async fn forget_idle_consumers(
        &self,
        queues: &[String],
        consumer: &str,
        idle: Duration,
    ) -> Result<usize> {
        self.timed(QueueOperation::ForgetConsumers, async {
            match &self.backend {
                Backend::Redis(queue) => queue.forget_idle_consumers(queues, consumer, idle).await,
                // The in-process queue keeps no consumers.
                Backend::Memory(_) => Ok(0),
            }
        })
        .await
    }

    /// Task ids currently waiting or delivered-but-unacked in `queue` (for the reconciler).
    pub async fn pending_task_ids(&self, queue: &str) -> Result<HashSet<TaskId>> {
        self.timed(QueueOperation::Pending, async {
            match &self.backend {
                Backend::Redis(q) => q.pending_task_ids(queue).await,
                Backend::Memory(q) => Ok(q.pending_task_ids(queue)),
            }
        })
        .await
    }

    /// Entries not yet acked and the age of the oldest, for metrics.
    pub async fn depth(&self, queue: &str) -> Result<QueueDepth> {
        match &self.backend {
            Backend::Redis(q) => q.depth(queue).await,
            Backend::Memory(q) => Ok(q.depth(queue)),
        }
    }

    /// Checks that the backend answers (readiness probes).
    pub async fn ping(&self) -> Result<()> {
        self.timed(QueueOperation::Ping, async {
            match &self.backend {
                Backend::Redis(queue) => queue.ping().await,
                Backend::Memory(_) => Ok(()),
            }
        })
        .await
    }
}

/// `queues` without repetitions, first occurrence kept.
fn distinct(queues: &[String]) -> Vec<&str> {
    let mut seen = HashSet::new();
    queues
        .iter()
        .map(String::as_str)
        .filter(|queue| seen.insert(*queue))
        .collect()
}

/// The instant `block` from now; a block too long to represent waits a year instead.
fn deadline(block: Duration) -> tokio::time::Instant {
    const YEAR: Duration = Duration::from_hours(365 * 24);
    let now = tokio::time::Instant::now();
    now.checked_add(block)
        .or_else(|| now.checked_add(YEAR))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Delivery, MemoryQueue, Queue, QueueEntry};
    use crate::task::TaskId;

    fn send<T: Send>(_: T) {}

    /// Launchers spawn queue calls onto the runtime, so every future must be `Send`.
    /// Enum dispatch gives one future type per operation, whichever backend runs it.
    #[test]
    fn every_operation_can_move_between_threads() {
        let queue = Queue::from(MemoryQueue::new());
        let entry = QueueEntry {
            task_id: TaskId::new(),
            queue: "default".to_owned(),
            priority: 0,
        };
        let delivery = Delivery {
            entry: entry.clone(),
            receipt: "memory:0".to_owned(),
        };
        let queues = vec!["default".to_owned()];
        send(queue.clone());
        send(queue.enqueue(&entry));
        send(queue.receive(&queues, "c", 1, Duration::ZERO));
        send(queue.ack(&delivery));
        send(queue.claim_abandoned(&queues, "c", Duration::ZERO, 1));
        send(queue.pending_task_ids("default"));
        send(queue.depth("default"));
        send(queue.ping());
    }
}
