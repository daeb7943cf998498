//! The Redis Streams backend. Each queue is three streams, one per priority band,
//! `<prefix>q:<queue>:high|normal|low`, each read through one consumer group. An entry's
//! fields are the task id, its priority and the enqueue time in Unix milliseconds.
//!
//! - `receive` reads the bands in order (high, normal, low) without blocking, each band
//!   in one XREADGROUP over the streams of all queues (so at most three commands whatever
//!   the number of queues), with COUNT what is still wanted; within a band the oldest
//!   entries across its queues are handed out first, and what several queues answered
//!   beyond `max` waits in the consumer's overflow for its next `receive`. Only when
//!   every stream is empty does it block (XREADGROUP BLOCK on all of them) on a
//!   connection of its own, so a blocked read never stalls the commands of other callers.
//! - `ack` is XACK and XDEL in one transaction, so the streams hold only entries not yet
//!   acked, and XLEN and XRANGE describe exactly what is pending.
//! - A missing stream or group (a first use, a flush, deleted keys) is created on demand
//!   (XGROUP CREATE … 0 MKSTREAM, BUSYGROUP ignored) and the read retried; a group
//!   created at `0` delivers whatever the stream already holds.
//! - A connection that breaks is dropped and re-opened by the next call.
//! - An entry that cannot be decoded is acked and deleted with a warning: it can never be
//!   launched, and the reconciler re-enqueues its task if the store still has it queued.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamRangeReply, StreamReadReply,
};
use redis::{Client, Cmd, RedisError, RedisResult};
use tokio::time::Instant;
use tracing::{debug, warn};

mod connection;
mod tls;

use super::{Delivery, QueueDepth, QueueEntry, QueueError, Result, distinct};
use crate::task::TaskId;
use connection::is_unavailable;

const FIELD_TASK: &str = "task";
const FIELD_PRIORITY: &str = "priority";
const FIELD_ENQUEUED_AT: &str = "enqueued_at";

/// How long to wait for a connection to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the reply to a non-blocking command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than its BLOCK to wait for the reply to a blocking read.
const BLOCK_GRACE: Duration = Duration::from_secs(5);
/// Idle blocking-read connections kept for reuse.
const IDLE_BLOCKING_CONNECTIONS: usize = 8;
/// The key (after the prefix) readiness writes to learn that the server takes writes.
const READINESS_KEY: &str = "readyz";
/// How long that key lives: it is rewritten by every check, and gone soon after the last.
const READINESS_KEY_TTL_MILLIS: u64 = 60_000;
/// Entries per XRANGE page when listing a stream.
const RANGE_PAGE: usize = 500;
/// The cursor that starts and ends an XAUTOCLAIM scan.
const SCAN_START: &str = "0-0";

/// A priority band: one stream per band and queue. Declared in read order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Band {
    High,
    Normal,
    Low,
}

impl Band {
    const ALL: [Self; 3] = [Self::High, Self::Normal, Self::Low];

    fn of(priority: i32) -> Self {
        match priority.cmp(&0) {
            std::cmp::Ordering::Greater => Self::High,
            std::cmp::Ordering::Equal => Self::Normal,
            std::cmp::Ordering::Less => Self::Low,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
}

/// One stream: a queue's band.
#[derive(Debug, Clone)]
struct Stream {
    key: String,
    queue: String,
    band: Band,
}

/// The Redis Streams queue. Clones share connections.
#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    prefix: String,
    group: String,
    /// The shared multiplexed connection for every non-blocking command; `None` after it
    /// broke, until the next call opens a new one.
    commands: Mutex<Option<MultiplexedConnection>>,
    /// Idle connections for blocking reads, one per concurrent blocked receive.
    blocking: Mutex<Vec<MultiplexedConnection>>,
    /// Deliveries a blocking read returned beyond the `max` asked for, per consumer. They
    /// are already delivered to that consumer in Redis, so its next receive returns them.
    overflow: Mutex<HashMap<String, Vec<Delivery>>>,
    /// Which queue the next receive reads first within a band.
    rotation: AtomicUsize,
}

impl fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueue")
            .field("prefix", &self.inner.prefix)
            .field("group", &self.inner.group)
            .finish_non_exhaustive()
    }
}

/// Locks `mutex`; every critical section here is a single move in or out of a collection,
/// so a poisoned lock still guards consistent data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RedisQueue {
    /// Connects to the server at `url`; every key the queue touches starts with
    /// `key_prefix`, and launchers read through the consumer group `group`.
    pub async fn connect(url: &str, key_prefix: &str, group: &str) -> Result<Self> {
        Self::connect_trusting(url, None, key_prefix, group).await
    }

    /// [`RedisQueue::connect`]; a `rediss://` URL speaks TLS and checks the server's
    /// certificate against `ca_pem` (PEM certificates) when given, else against the
    /// Mozilla roots, and that it names the URL's host. `#insecure` is refused.
    pub async fn connect_trusting(
        url: &str,
        ca_pem: Option<Vec<u8>>,
        key_prefix: &str,
        group: &str,
    ) -> Result<Self> {
        let client = tls::client(url, ca_pem)?;
        let queue = Self {
            inner: Arc::new(Inner {
                client,
                prefix: key_prefix.to_owned(),
                group: group.to_owned(),
                commands: Mutex::new(None),
                blocking: Mutex::new(Vec::new()),
                overflow: Mutex::new(HashMap::new()),
                rotation: AtomicUsize::new(0),
            }),
        };
        queue.ping().await.map_err(tls::explained)?;
        Ok(queue)
    }

    /// Whether the queue can be used now: the server answers and takes writes. `PING`
    /// alone is not enough: a primary demoted to a replica answers it but refuses every
    /// queue command with `READONLY`, so readiness writes a short-lived key of its own.
    pub(super) async fn ping(&self) -> Result<()> {
        let key = format!("{}{READINESS_KEY}", self.inner.prefix);
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(1).arg("PX").arg(READINESS_KEY_TTL_MILLIS);
        let _: String = self.query("ping", &key, &set).await?;
        Ok(())
    }

    pub(super) async fn enqueue(&self, entry: &QueueEntry) -> Result<()> {
        let key = self.key(&entry.queue, Band::of(entry.priority));
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&key)
            .arg("*")
            .arg(FIELD_TASK)
            .arg(entry.task_id.to_string())
            .arg(FIELD_PRIORITY)
            .arg(entry.priority)
            .arg(FIELD_ENQUEUED_AT)
            .arg(jiff::Timestamp::now().as_millisecond());
        let _id: String = self.query("enqueue", &key, &xadd).await?;
        Ok(())
    }

    pub(super) async fn receive(
        &self,
        queues: &[String],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let queues = self.rotated(&distinct(queues));
        let overflow = self.take_overflow(consumer, &queues, max);
        if !overflow.is_empty() {
            return Ok(overflow);
        }
        let deadline = super::deadline(block);
        // Every queue's every band, highest band first.
        let streams: Vec<Stream> = Band::ALL
            .into_iter()
            .flat_map(|band| queues.iter().map(move |queue| (queue, band)))
            .map(|(queue, band)| self.stream(queue, band))
            .collect();
        loop {
            // One XREADGROUP per band over all its queues, highest band first, while
            // room is left: at most three commands whatever the number of queues, and no
            // entry of a lower band taken while a higher one waits. Several queues of a
            // band answer up to COUNT each: the oldest are handed out, the rest wait in
            // this consumer's overflow.
            let mut taken = Vec::new();
            for band in Band::ALL {
                if taken.len() >= max {
                    break;
                }
                let of_band: Vec<Stream> = streams
                    .iter()
                    .filter(|stream| stream.band == band)
                    .cloned()
                    .collect();
                taken.extend(self.read(&of_band, consumer, max - taken.len()).await?);
            }
            if !taken.is_empty() {
                return Ok(self.hand_out(consumer, taken, max));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < Duration::from_millis(1) {
                return Ok(Vec::new());
            }
            if queues.is_empty() {
                tokio::time::sleep(remaining).await;
                return Ok(Vec::new());
            }
            let woken = self
                .read_blocking(&streams, consumer, max, remaining)
                .await?;
            if !woken.is_empty() {
                return Ok(self.hand_out(consumer, woken, max));
            }
            // The block ran out, or a stream vanished while we waited and its group was
            // re-created: look again (non-blocking) and wait for what is left.
        }
    }

    /// Acknowledges and deletes `deliveries` in one atomic pipeline: an XACK and an XDEL
    /// per stream, naming every entry of that stream.
    pub(super) async fn ack(&self, deliveries: &[Delivery]) -> Result<()> {
        let mut by_stream: std::collections::BTreeMap<String, Vec<&str>> =
            std::collections::BTreeMap::new();
        for delivery in deliveries {
            let receipt = &delivery.receipt;
            if parse_id(receipt).is_none() {
                return Err(QueueError::InvalidReceipt {
                    receipt: receipt.clone(),
                    queue: delivery.entry.queue.clone(),
                    expected: "a redis stream entry id (<millis>-<sequence>)",
                });
            }
            let key = self.key(&delivery.entry.queue, Band::of(delivery.entry.priority));
            by_stream.entry(key).or_default().push(receipt);
        }
        let Some(first_key) = by_stream.keys().next().cloned() else {
            return Ok(());
        };
        let mut transaction = redis::pipe();
        transaction.atomic();
        for (key, receipts) in &by_stream {
            transaction
                .cmd("XACK")
                .arg(key)
                .arg(&self.inner.group)
                .arg(receipts)
                .ignore()
                .cmd("XDEL")
                .arg(key)
                .arg(receipts)
                .ignore();
        }
        self.pipe_raw::<()>(&transaction)
            .await?
            .map_err(|source| self.failure("ack", &first_key, source))
    }

    pub(super) async fn forget_idle_consumers(
        &self,
        queues: &[String],
        consumer: &str,
        idle: Duration,
    ) -> Result<usize> {
        let min_idle = usize::try_from(idle.as_millis()).unwrap_or(usize::MAX);
        let mut forgotten = 0;
        for queue in distinct(queues) {
            for band in Band::ALL {
                let stream = self.stream(queue, band);
                let mut xinfo = redis::cmd("XINFO");
                xinfo
                    .arg("CONSUMERS")
                    .arg(&stream.key)
                    .arg(&self.inner.group);
                let reply: StreamInfoConsumersReply = match self.query_raw(&xinfo).await? {
                    Ok(reply) => reply,
                    // No stream or no group yet: no consumers either.
                    Err(e) if group_missing(&e) || no_such_key(&e) => continue,
                    Err(e) => return Err(self.failure("forget consumers", &stream.key, e)),
                };
                for idle_one in reply
                    .consumers
                    .iter()
                    .filter(|c| c.name != consumer && c.pending == 0 && c.idle >= min_idle)
                {
                    let mut delconsumer = redis::cmd("XGROUP");
                    delconsumer
                        .arg("DELCONSUMER")
                        .arg(&stream.key)
                        .arg(&self.inner.group)
                        .arg(&idle_one.name);
                    let _: i64 = self
                        .query("forget consumers", &stream.key, &delconsumer)
                        .await?;
                    debug!(consumer = %idle_one.name, stream = %stream.key, "forgot an idle consumer");
                    forgotten += 1;
                }
            }
        }
        Ok(forgotten)
    }

    pub(super) async fn claim_abandoned(
        &self,
        queues: &[String],
        consumer: &str,
        idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>> {
        let queues = distinct(queues);
        let min_idle = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let mut claimed = Vec::new();
        for band in Band::ALL {
            for queue in &queues {
                let stream = self.stream(queue, band);
                let mut cursor = SCAN_START.to_owned();
                loop {
                    let wanted = max - claimed.len();
                    if wanted == 0 {
                        return Ok(claimed);
                    }
                    let mut xautoclaim = redis::cmd("XAUTOCLAIM");
                    xautoclaim
                        .arg(&stream.key)
                        .arg(&self.inner.group)
                        .arg(consumer)
                        .arg(min_idle)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(wanted);
                    let reply: StreamAutoClaimReply = match self.query_raw(&xautoclaim).await? {
                        Ok(reply) => reply,
                        // No group, nothing was ever delivered from this stream.
                        Err(e) if group_missing(&e) => break,
                        Err(e) => return Err(self.failure("claim", &stream.key, e)),
                    };
                    for entry in &reply.claimed {
                        if let Some(delivery) = self.decode(&stream, entry).await {
                            debug!(
                                task_id = %delivery.entry.task_id,
                                queue = %stream.queue,
                                consumer,
                                "claimed abandoned entry"
                            );
                            claimed.push(delivery);
                        }
                    }
                    if reply.next_stream_id == SCAN_START {
                        break;
                    }
                    cursor = reply.next_stream_id;
                }
            }
        }
        Ok(claimed)
    }

    pub(super) async fn pending_task_ids(&self, queue: &str) -> Result<HashSet<TaskId>> {
        let mut ids = HashSet::new();
        for band in Band::ALL {
            let stream = self.stream(queue, band);
            let mut start = "-".to_owned();
            loop {
                let mut xrange = redis::cmd("XRANGE");
                xrange
                    .arg(&stream.key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(RANGE_PAGE);
                let page: StreamRangeReply =
                    self.query("list pending", &stream.key, &xrange).await?;
                for entry in &page.ids {
                    if let Some((task_id, _)) = decode_fields(entry) {
                        ids.insert(task_id);
                    } else {
                        warn!(key = %stream.key, id = %entry.id, "skipping an undecodable queue entry");
                    }
                }
                match page.ids.last() {
                    Some(last) if page.ids.len() == RANGE_PAGE => start = format!("({}", last.id),
                    _ => break,
                }
            }
        }
        Ok(ids)
    }

    pub(super) async fn depth(&self, queue: &str) -> Result<QueueDepth> {
        let mut waiting = 0;
        let mut oldest: Option<u64> = None;
        for band in Band::ALL {
            let key = self.key(queue, band);
            let mut probe = redis::pipe();
            probe
                .cmd("XLEN")
                .arg(&key)
                .cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1);
            let (length, first) = self
                .pipe_raw::<(u64, StreamRangeReply)>(&probe)
                .await?
                .map_err(|source| self.failure("depth", &key, source))?;
            waiting += length;
            if let Some((millis, _)) = first.ids.first().and_then(|entry| parse_id(&entry.id)) {
                oldest = Some(oldest.map_or(millis, |oldest| oldest.min(millis)));
            }
        }
        let now = u64::try_from(jiff::Timestamp::now().as_millisecond()).unwrap_or(0);
        Ok(QueueDepth {
            waiting,
            oldest_age: oldest.map(|millis| Duration::from_millis(now.saturating_sub(millis))),
        })
    }

    // --- keys and streams ---

    fn key(&self, queue: &str, band: Band) -> String {
        format!("{}q:{queue}:{}", self.inner.prefix, band.as_str())
    }

    fn stream(&self, queue: &str, band: Band) -> Stream {
        Stream {
            key: self.key(queue, band),
            queue: queue.to_owned(),
            band,
        }
    }

    /// `queues`, starting at a different one on each call.
    fn rotated<'q>(&self, queues: &[&'q str]) -> Vec<&'q str> {
        let start = self.inner.rotation.fetch_add(1, Ordering::Relaxed);
        let len = queues.len().max(1);
        queues
            .iter()
            .cycle()
            .skip(start % len)
            .take(queues.len())
            .copied()
            .collect()
    }

    // --- reading ---

    /// XREADGROUP of new entries from one stream, without blocking; creates the group
    /// if it is missing and reads again.
    async fn read(
        &self,
        streams: &[Stream],
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Delivery>> {
        let xreadgroup = self.xreadgroup(streams, consumer, count, None);
        let mut group_created = false;
        loop {
            match self
                .query_raw::<Option<StreamReadReply>>(&xreadgroup)
                .await?
            {
                Ok(reply) => return Ok(self.deliveries(streams, reply).await),
                Err(e) if group_missing(&e) && !group_created => {
                    self.create_groups(streams).await?;
                    group_created = true;
                }
                Err(e) => return Err(self.failure("receive", &keys(streams), e)),
            }
        }
    }

    /// XREADGROUP BLOCK on `streams`, on a connection of its own. Returns nothing when the
    /// block ran out, or when a stream or group vanished (after re-creating it).
    async fn read_blocking(
        &self,
        streams: &[Stream],
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>> {
        let xreadgroup = self.xreadgroup(streams, consumer, count, Some(block));
        let mut connection = self.blocking_connection().await?;
        connection.set_response_timeout(block.saturating_add(BLOCK_GRACE));
        let reply: RedisResult<Option<StreamReadReply>> =
            xreadgroup.query_async(&mut connection).await;
        match reply {
            Ok(reply) => {
                self.return_blocking_connection(connection);
                Ok(self.deliveries(streams, reply).await)
            }
            Err(e) if is_unavailable(&e) => {
                // The server went away: the idle ones are most likely broken too.
                lock(&self.inner.blocking).clear();
                Err(QueueError::Unavailable {
                    operation: "receive",
                    source: e,
                })
            }
            Err(e) if group_missing(&e) => {
                self.return_blocking_connection(connection);
                debug!(error = %e, "a stream or consumer group vanished during a blocking read");
                self.create_groups(streams).await?;
                Ok(Vec::new())
            }
            Err(e) => {
                self.return_blocking_connection(connection);
                Err(self.failure("receive", &keys(streams), e))
            }
        }
    }

    fn xreadgroup(
        &self,
        streams: &[Stream],
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Cmd {
        let mut xreadgroup = redis::cmd("XREADGROUP");
        xreadgroup
            .arg("GROUP")
            .arg(&self.inner.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            // Never 0, which would block forever.
            let millis = u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1);
            xreadgroup.arg("BLOCK").arg(millis);
        }
        xreadgroup.arg("STREAMS");
        for stream in streams {
            xreadgroup.arg(&stream.key);
        }
        for _ in streams {
            xreadgroup.arg(">");
        }
        xreadgroup
    }

    /// XGROUP CREATE … 0 MKSTREAM for each stream; an existing group is fine.
    async fn create_groups(&self, streams: &[Stream]) -> Result<()> {
        for stream in streams {
            let mut create = redis::cmd("XGROUP");
            create
                .arg("CREATE")
                .arg(&stream.key)
                .arg(&self.inner.group)
                .arg("0")
                .arg("MKSTREAM");
            match self.query_raw::<()>(&create).await? {
                Ok(()) => {
                    debug!(key = %stream.key, group = %self.inner.group, "created consumer group");
                }
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(self.failure("create consumer group", &stream.key, e)),
            }
        }
        Ok(())
    }

    /// The deliveries in an XREADGROUP reply, in band then entry order.
    async fn deliveries(
        &self,
        streams: &[Stream],
        reply: Option<StreamReadReply>,
    ) -> Vec<Delivery> {
        let mut deliveries = Vec::new();
        for stream_entries in reply.map(|reply| reply.keys).unwrap_or_default() {
            let Some(stream) = streams
                .iter()
                .find(|stream| stream.key == stream_entries.key)
            else {
                warn!(key = %stream_entries.key, "redis replied with a stream that was not asked for");
                continue;
            };
            for entry in &stream_entries.ids {
                if let Some(delivery) = self.decode(stream, entry).await {
                    deliveries.push((stream.band, delivery));
                }
            }
        }
        deliveries.sort_by_key(|(band, delivery)| (*band, parse_id(&delivery.receipt)));
        deliveries
            .into_iter()
            .map(|(_, delivery)| delivery)
            .collect()
    }

    /// The delivery of a stream entry; an entry that cannot be decoded is acked and
    /// deleted (see the module docs) and gives nothing.
    async fn decode(&self, stream: &Stream, entry: &StreamId) -> Option<Delivery> {
        if let Some((task_id, priority)) = decode_fields(entry) {
            return Some(Delivery {
                entry: QueueEntry {
                    task_id,
                    queue: stream.queue.clone(),
                    priority,
                },
                receipt: entry.id.clone(),
            });
        }
        warn!(key = %stream.key, id = %entry.id, "dropping an undecodable queue entry");
        let mut transaction = redis::pipe();
        transaction
            .atomic()
            .cmd("XACK")
            .arg(&stream.key)
            .arg(&self.inner.group)
            .arg(&entry.id)
            .ignore()
            .cmd("XDEL")
            .arg(&stream.key)
            .arg(&entry.id)
            .ignore();
        if let Err(e) = self.pipe_raw::<()>(&transaction).await {
            warn!(key = %stream.key, id = %entry.id, error = %e, "could not drop an undecodable queue entry");
        }
        None
    }

    /// Returns up to `max` of `deliveries` and keeps the rest for the consumer's next
    /// receive (they are already delivered to it in Redis).
    fn hand_out(&self, consumer: &str, mut deliveries: Vec<Delivery>, max: usize) -> Vec<Delivery> {
        if deliveries.len() > max {
            let rest = deliveries.split_off(max);
            lock(&self.inner.overflow)
                .entry(consumer.to_owned())
                .or_default()
                .extend(rest);
        }
        deliveries
    }

    /// Up to `max` kept deliveries of `consumer` from `queues`.
    fn take_overflow(&self, consumer: &str, queues: &[&str], max: usize) -> Vec<Delivery> {
        let mut overflow = lock(&self.inner.overflow);
        let Some(kept) = overflow.get_mut(consumer) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        kept.retain(|delivery| {
            if taken.len() < max && queues.contains(&delivery.entry.queue.as_str()) {
                taken.push(delivery.clone());
                false
            } else {
                true
            }
        });
        if kept.is_empty() {
            overflow.remove(consumer);
        }
        taken
    }
}

/// The task id and priority of a stream entry.
fn decode_fields(entry: &StreamId) -> Option<(TaskId, i32)> {
    let task_id = entry.get::<String>(FIELD_TASK)?.parse().ok()?;
    let priority = entry.get::<i32>(FIELD_PRIORITY)?;
    Some((task_id, priority))
}

/// The (milliseconds, sequence) of a stream entry id.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (millis, sequence) = id.split_once('-')?;
    Some((millis.parse().ok()?, sequence.parse().ok()?))
}

fn keys(streams: &[Stream]) -> String {
    streams
        .iter()
        .map(|stream| stream.key.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A stream or its group is gone: NOGROUP on a read, UNBLOCKED for a blocked read whose
/// stream was deleted.
fn group_missing(error: &RedisError) -> bool {
    matches!(error.code(), Some("NOGROUP" | "UNBLOCKED"))
}

/// XINFO's answer for a stream that does not exist (`ERR no such key`).
fn no_such_key(error: &RedisError) -> bool {
    error.code() == Some("ERR") && error.to_string().contains("no such key")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic; that is how they fail
mod tests;
