//! The in-process queue of the embedded single-process mode: entries ordered by priority
//! (highest first), then FIFO; a [`Notify`] wakes blocked receivers; delivered entries stay
//! tracked, with their delivery time, until acked, so [`MemoryQueue::claim_abandoned`]
//! behaves as Redis's XAUTOCLAIM does. Nothing survives the process, which is fine: the
//! embedded mode refills the queue from the store at start.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use super::{Delivery, QueueDepth, QueueEntry, QueueError, Result, distinct};
use crate::task::TaskId;

const RECEIPT_PREFIX: &str = "memory:";

/// The in-process queue. Clones share the same entries.
#[derive(Debug, Clone, Default)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled on every enqueue.
    arrived: Notify,
}

/// Order of waiting entries inside a queue: priority descending, then enqueue order.
type Rank = (Reverse<i32>, u64);

#[derive(Debug, Default)]
struct State {
    /// The sequence number of the next entry; also its receipt.
    next_seq: u64,
    /// Entries waiting for a consumer, per queue.
    waiting: HashMap<String, BTreeMap<Rank, Waiting>>,
    /// Entries delivered and not acked, by sequence number.
    delivered: BTreeMap<u64, Unacked>,
}

#[derive(Debug)]
struct Waiting {
    task_id: TaskId,
    enqueued_at: Instant,
}

#[derive(Debug)]
struct Unacked {
    entry: QueueEntry,
    consumer: String,
    enqueued_at: Instant,
    delivered_at: Instant,
}

impl MemoryQueue {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // breaks a later caller (each change is a single insert or remove), so go on.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn enqueue(&self, entry: &QueueEntry) {
        {
            let mut state = self.state();
            let seq = state.next_seq;
            state.next_seq += 1;
            state
                .waiting
                .entry(entry.queue.clone())
                .or_default()
                .insert(
                    (Reverse(entry.priority), seq),
                    Waiting {
                        task_id: entry.task_id,
                        enqueued_at: Instant::now(),
                    },
                );
        }
        self.shared.arrived.notify_waiters();
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
        let queues = distinct(queues);
        let deadline = super::deadline(block);
        loop {
            // Register for the wake-up before looking, so an enqueue between the look and
            // the wait is not missed.
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let taken = self.state().take(&queues, consumer, max);
            if !taken.is_empty() {
                return Ok(taken);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    pub(super) fn ack(&self, deliveries: &[Delivery]) -> Result<()> {
        let seqs = deliveries
            .iter()
            .map(|delivery| {
                delivery
                    .receipt
                    .strip_prefix(RECEIPT_PREFIX)
                    .and_then(|seq| seq.parse::<u64>().ok())
                    .ok_or_else(|| QueueError::InvalidReceipt {
                        receipt: delivery.receipt.clone(),
                        queue: delivery.entry.queue.clone(),
                        expected: "an in-memory receipt (memory:<sequence>)",
                    })
            })
            .collect::<Result<Vec<u64>>>()?;
        let mut state = self.state();
        for seq in seqs {
            state.delivered.remove(&seq);
        }
        Ok(())
    }

    pub(super) fn claim_abandoned(
        &self,
        queues: &[String],
        consumer: &str,
        idle: Duration,
        max: usize,
    ) -> Vec<Delivery> {
        let queues = distinct(queues);
        let now = Instant::now();
        let mut state = self.state();
        let mut abandoned: Vec<(u64, &mut Unacked)> = state
            .delivered
            .iter_mut()
            .filter(|(_, unacked)| {
                queues.contains(&unacked.entry.queue.as_str())
                    && now.saturating_duration_since(unacked.delivered_at) >= idle
            })
            .map(|(seq, unacked)| (*seq, unacked))
            .collect();
        abandoned.sort_by_key(|(seq, unacked)| (Reverse(unacked.entry.priority), *seq));
        abandoned
            .into_iter()
            .take(max)
            .map(|(seq, unacked)| {
                debug!(
                    task_id = %unacked.entry.task_id,
                    queue = %unacked.entry.queue,
                    from = %unacked.consumer,
                    to = consumer,
                    "claimed abandoned entry"
                );
                consumer.clone_into(&mut unacked.consumer);
                unacked.delivered_at = now;
                Delivery {
                    entry: unacked.entry.clone(),
                    receipt: receipt(seq),
                }
            })
            .collect()
    }

    pub(super) fn pending_task_ids(&self, queue: &str) -> HashSet<TaskId> {
        let state = self.state();
        let waiting = state
            .waiting
            .get(queue)
            .into_iter()
            .flat_map(|entries| entries.values().map(|waiting| waiting.task_id));
        let delivered = state
            .delivered
            .values()
            .filter(|unacked| unacked.entry.queue == queue)
            .map(|unacked| unacked.entry.task_id);
        waiting.chain(delivered).collect()
    }

    pub(super) fn depth(&self, queue: &str) -> QueueDepth {
        let state = self.state();
        let waiting = state
            .waiting
            .get(queue)
            .into_iter()
            .flat_map(|entries| entries.values().map(|waiting| waiting.enqueued_at));
        let delivered = state
            .delivered
            .values()
            .filter(|unacked| unacked.entry.queue == queue)
            .map(|unacked| unacked.enqueued_at);
        let (count, oldest) = waiting
            .chain(delivered)
            .fold((0_u64, None::<Instant>), |(count, oldest), at| {
                (count + 1, Some(oldest.map_or(at, |oldest| oldest.min(at))))
            });
        QueueDepth {
            waiting: count,
            oldest_age: oldest.map(|at| Instant::now().saturating_duration_since(at)),
        }
    }
}

impl State {
    /// Moves up to `max` of the best waiting entries of `queues` to the delivered set.
    fn take(&mut self, queues: &[&str], consumer: &str, max: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let mut taken = Vec::new();
        while taken.len() < max {
            let best = queues
                .iter()
                .filter_map(|queue| {
                    let (rank, _) = self.waiting.get(*queue)?.first_key_value()?;
                    Some((*rank, *queue))
                })
                .min_by_key(|(rank, _)| *rank);
            let Some((rank, queue)) = best else { break };
            let Some(entries) = self.waiting.get_mut(queue) else {
                break;
            };
            let Some(waiting) = entries.remove(&rank) else {
                break;
            };
            if entries.is_empty() {
                self.waiting.remove(queue);
            }
            let (Reverse(priority), seq) = rank;
            let entry = QueueEntry {
                task_id: waiting.task_id,
                queue: queue.to_owned(),
                priority,
            };
            self.delivered.insert(
                seq,
                Unacked {
                    entry: entry.clone(),
                    consumer: consumer.to_owned(),
                    enqueued_at: waiting.enqueued_at,
                    delivered_at: now,
                },
            );
            taken.push(Delivery {
                entry,
                receipt: receipt(seq),
            });
        }
        taken
    }
}

fn receipt(seq: u64) -> String {
    format!("{RECEIPT_PREFIX}{seq}")
}
