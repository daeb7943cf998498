//! The queue's behaviour. Each case is written once and runs on both backends: Redis
//! Streams on the real server of the test environment (every test in a key space of its
//! own) and the in-process queue. A few cases only make sense for Redis (keys vanishing,
//! key prefixes, connection failures) and run on it alone.
//!
//! Start Redis with `eval "$(tests/env/up redis)"`; without `REDIS_URL` the Redis tests
//! skip with one line (and fail under `make test`, see `testsupport::needs_env!`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use dispatcher::queue::{
    Delivery, MemoryQueue, Queue, QueueDepth, QueueEntry, QueueError, RedisQueue,
};
use dispatcher::task::TaskId;
use testsupport::{RedisKeySpace, poll_until, with_redis_keyspace};

const GROUP: &str = "launchers";
/// A block no test waits out: a receive given this long returns because an entry came.
const LONG_BLOCK: Duration = Duration::from_mins(1);
/// How long to wait for what should happen at once (a loaded 2-core machine is slow).
const PROMPT: Duration = Duration::from_secs(15);
/// How long a receive must keep waiting to show that it blocks.
const STILL_WAITING: Duration = Duration::from_millis(300);

// --- the two backends ---

async fn redis_queue(space: &RedisKeySpace) -> Queue {
    RedisQueue::connect(&space.url, &space.prefix, GROUP)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", space.url))
        .into()
}

async fn on_redis<F, Fut>(case: F)
where
    F: FnOnce(Queue) -> Fut,
    Fut: Future<Output = ()>,
{
    testsupport::needs_env!(Redis);
    with_redis_keyspace(|space| async move { case(redis_queue(&space).await).await }).await;
}

async fn on_memory<F, Fut>(case: F)
where
    F: FnOnce(Queue) -> Fut,
    Fut: Future<Output = ()>,
{
    case(MemoryQueue::new().into()).await;
}

/// One test per backend for each case: `redis_backend::<case>` and `memory_backend::<case>`.
macro_rules! on_both_backends {
    ($($case:ident),+ $(,)?) => {
        mod redis_backend {
            $(
                #[tokio::test]
                async fn $case() {
                    super::on_redis(super::$case).await;
                }
            )+
        }
        mod memory_backend {
            $(
                #[tokio::test]
                async fn $case() {
                    super::on_memory(super::$case).await;
                }
            )+
        }
    };
}

on_both_backends!(
    fifo_within_a_priority,
    higher_priority_first,
    higher_priority_first_across_queues,
    receive_waits_for_the_block_then_returns_empty,
    blocked_receive_wakes_when_an_entry_arrives,
    receive_never_returns_more_than_max,
    ack_removes_the_entry,
    an_unacked_delivery_is_claimed_by_another_consumer_after_idle,
    pending_task_ids_and_depth,
    ack_refuses_a_foreign_receipt,
);

// --- fixtures ---

/// A fresh task's entry in `queue` at `priority`.
fn entry(queue: &str, priority: i32) -> QueueEntry {
    QueueEntry {
        task_id: TaskId::new(),
        queue: queue.to_owned(),
        priority,
    }
}

fn names(queues: &[&str]) -> Vec<String> {
    queues.iter().map(|&queue| queue.to_owned()).collect()
}

fn ids_of_entries(entries: &[QueueEntry]) -> Vec<TaskId> {
    entries.iter().map(|entry| entry.task_id).collect()
}

fn ids(deliveries: &[Delivery]) -> Vec<TaskId> {
    deliveries
        .iter()
        .map(|delivery| delivery.entry.task_id)
        .collect()
}

async fn enqueue_all(queue: &Queue, entries: &[QueueEntry]) {
    for entry in entries {
        queue.enqueue(entry).await.unwrap();
    }
}

/// What is ready now, without waiting.
async fn receive_now(queue: &Queue, queues: &[&str], consumer: &str, max: usize) -> Vec<Delivery> {
    queue
        .receive(&names(queues), consumer, max, Duration::ZERO)
        .await
        .unwrap()
}

/// Receives one at a time until nothing is ready.
async fn drain_one_by_one(queue: &Queue, queues: &[&str]) -> Vec<Delivery> {
    let mut received = Vec::new();
    loop {
        let batch = receive_now(queue, queues, "drainer", 1).await;
        assert!(batch.len() <= 1, "asked for one, got {}", batch.len());
        if batch.is_empty() {
            return received;
        }
        received.extend(batch);
    }
}

// --- the cases ---

async fn fifo_within_a_priority(queue: Queue) {
    for (name, priority) in [("normal", 0), ("high", 7), ("low", -2)] {
        let entries: Vec<QueueEntry> = (0..5).map(|_| entry(name, priority)).collect();
        enqueue_all(&queue, &entries).await;

        let mut received = Vec::new();
        for _ in 0..3 {
            received.extend(receive_now(&queue, &[name], "a", 2).await);
        }

        assert_eq!(
            ids(&received),
            ids_of_entries(&entries),
            "priority {priority}"
        );
        for (delivery, entry) in received.iter().zip(&entries) {
            assert_eq!(&delivery.entry, entry);
        }
    }
}

async fn higher_priority_first(queue: Queue) {
    let low = [entry("work", -1), entry("work", -5)];
    let normal = [entry("work", 0), entry("work", 0)];
    let high = [entry("work", 3), entry("work", 3)];
    // Interleaved, lowest first, so neither arrival order nor chance gives the answer.
    enqueue_all(
        &queue,
        &[
            low[0].clone(),
            normal[0].clone(),
            high[0].clone(),
            low[1].clone(),
            normal[1].clone(),
            high[1].clone(),
        ],
    )
    .await;

    let received = drain_one_by_one(&queue, &["work"]).await;

    let expected: Vec<TaskId> = [&high, &normal, &low]
        .into_iter()
        .flat_map(|band| ids_of_entries(band))
        .collect();
    assert_eq!(ids(&received), expected);
}

async fn higher_priority_first_across_queues(queue: Queue) {
    let low_in_a = entry("a", -1);
    let normal_in_b = entry("b", 0);
    let high_in_c = entry("c", 5);
    enqueue_all(
        &queue,
        &[low_in_a.clone(), normal_in_b.clone(), high_in_c.clone()],
    )
    .await;

    let all = receive_now(&queue, &["a", "b", "c"], "a", 10).await;

    assert_eq!(
        ids(&all),
        vec![high_in_c.task_id, normal_in_b.task_id, low_in_a.task_id]
    );
}

async fn receive_waits_for_the_block_then_returns_empty(queue: Queue) {
    let block = Duration::from_millis(400);
    let started = Instant::now();

    let received = tokio::time::timeout(
        PROMPT,
        queue.receive(&names(&["empty", "also-empty"]), "a", 5, block),
    )
    .await
    .expect("receive did not return after its block ran out")
    .unwrap();

    assert!(received.is_empty(), "{received:?}");
    let waited = started.elapsed();
    assert!(
        waited + Duration::from_millis(5) >= block,
        "returned after {waited:?}, before the block of {block:?} ran out"
    );
}

async fn blocked_receive_wakes_when_an_entry_arrives(queue: Queue) {
    let mut waiting_receive = tokio::spawn({
        let queue = queue.clone();
        async move {
            queue
                .receive(&names(&["first", "second"]), "a", 5, LONG_BLOCK)
                .await
        }
    });
    assert!(
        tokio::time::timeout(STILL_WAITING, &mut waiting_receive)
            .await
            .is_err(),
        "receive returned while every queue was empty"
    );

    // A low-priority entry in the second queue: any stream must wake the receiver.
    let arriving = entry("second", -4);
    queue.enqueue(&arriving).await.unwrap();

    let received = tokio::time::timeout(PROMPT, waiting_receive)
        .await
        .expect("a blocked receive did not wake when an entry arrived")
        .unwrap()
        .unwrap();
    assert_eq!(ids(&received), vec![arriving.task_id]);
    assert_eq!(received[0].entry, arriving);
}

async fn receive_never_returns_more_than_max(queue: Queue) {
    let entries: Vec<QueueEntry> = ["x", "y", "z"]
        .into_iter()
        .flat_map(|name| [entry(name, 0), entry(name, 0), entry(name, 2)])
        .collect();
    enqueue_all(&queue, &entries).await;

    let mut received = Vec::new();
    for _ in 0..entries.len() {
        let batch = receive_now(&queue, &["x", "y", "z"], "a", 2).await;
        assert!(batch.len() <= 2, "asked for 2, got {}", batch.len());
        if batch.is_empty() {
            break;
        }
        received.extend(batch);
    }

    let mut received_ids = ids(&received);
    assert_eq!(received_ids.len(), entries.len(), "each entry exactly once");
    let high: HashSet<TaskId> = entries
        .iter()
        .filter(|entry| entry.priority > 0)
        .map(|entry| entry.task_id)
        .collect();
    let first_three: HashSet<TaskId> = received_ids[..3].iter().copied().collect();
    assert_eq!(first_three, high, "the high-priority entries come first");
    received_ids.sort();
    let mut expected = ids_of_entries(&entries);
    expected.sort();
    assert_eq!(received_ids, expected);
    assert!(
        receive_now(&queue, &["x", "y", "z"], "a", 2)
            .await
            .is_empty()
    );
}

async fn ack_removes_the_entry(queue: Queue) {
    let first = entry("acks", 0);
    let second = entry("acks", 0);
    enqueue_all(&queue, &[first.clone(), second.clone()]).await;

    let delivered = receive_now(&queue, &["acks"], "a", 1).await;
    assert_eq!(ids(&delivered), vec![first.task_id]);
    assert_eq!(
        queue.pending_task_ids("acks").await.unwrap(),
        HashSet::from([first.task_id, second.task_id]),
        "delivered but not acked is still pending"
    );

    queue.ack(&delivered[0]).await.unwrap();

    assert_eq!(
        queue.pending_task_ids("acks").await.unwrap(),
        HashSet::from([second.task_id])
    );
    assert_eq!(queue.depth("acks").await.unwrap().waiting, 1);
    queue.ack(&delivered[0]).await.unwrap(); // a second ack is harmless

    let rest = receive_now(&queue, &["acks"], "a", 10).await;
    assert_eq!(
        ids(&rest),
        vec![second.task_id],
        "the acked entry never comes back"
    );
    queue.ack(&rest[0]).await.unwrap();

    assert!(queue.pending_task_ids("acks").await.unwrap().is_empty());
    assert_eq!(
        queue.depth("acks").await.unwrap(),
        QueueDepth {
            waiting: 0,
            oldest_age: None
        }
    );
    let claimable = queue
        .claim_abandoned(&names(&["acks"]), "b", Duration::ZERO, 10)
        .await
        .unwrap();
    assert!(
        claimable.is_empty(),
        "acked entries are not claimable: {claimable:?}"
    );
}

async fn an_unacked_delivery_is_claimed_by_another_consumer_after_idle(queue: Queue) {
    let abandoned = entry("claims", 1);
    queue.enqueue(&abandoned).await.unwrap();
    let first = receive_now(&queue, &["claims"], "crashed", 1).await;
    assert_eq!(ids(&first), vec![abandoned.task_id]);

    let too_soon = queue
        .claim_abandoned(&names(&["claims"]), "rescuer", Duration::from_hours(1), 10)
        .await
        .unwrap();
    assert!(
        too_soon.is_empty(),
        "claimed before it was idle: {too_soon:?}"
    );
    assert!(
        receive_now(&queue, &["claims"], "rescuer", 10)
            .await
            .is_empty(),
        "a delivered entry is not handed out again by receive"
    );

    let claim_names = names(&["claims"]);
    let (queue_ref, claim_names) = (&queue, &claim_names);
    let claimed = poll_until(
        "the unacked entry to be claimed",
        PROMPT,
        move || async move {
            let claimed = queue_ref
                .claim_abandoned(claim_names, "rescuer", Duration::from_millis(100), 10)
                .await
                .map_err(|e| e.to_string())?;
            if claimed.is_empty() {
                Err("nothing claimable yet".to_owned())
            } else {
                Ok(claimed)
            }
        },
    )
    .await;

    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].entry, abandoned);
    assert_eq!(claimed[0].receipt, first[0].receipt);
    queue.ack(&claimed[0]).await.unwrap();
    assert!(
        queue
            .claim_abandoned(&names(&["claims"]), "another", Duration::ZERO, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(queue.pending_task_ids("claims").await.unwrap().is_empty());
}

async fn pending_task_ids_and_depth(queue: Queue) {
    let empty = QueueDepth {
        waiting: 0,
        oldest_age: None,
    };
    assert_eq!(queue.depth("a").await.unwrap(), empty);
    assert!(queue.pending_task_ids("a").await.unwrap().is_empty());

    let in_a = [entry("a", 3), entry("a", 0), entry("a", -3)];
    let in_b = entry("b", 0);
    enqueue_all(&queue, &in_a).await;
    queue.enqueue(&in_b).await.unwrap();

    let in_a_ids: HashSet<TaskId> = ids_of_entries(&in_a).into_iter().collect();
    assert_eq!(queue.pending_task_ids("a").await.unwrap(), in_a_ids);
    assert_eq!(
        queue.pending_task_ids("b").await.unwrap(),
        HashSet::from([in_b.task_id])
    );
    assert_eq!(queue.depth("a").await.unwrap().waiting, 3);
    assert_eq!(queue.depth("b").await.unwrap().waiting, 1);
    assert_eq!(queue.depth("c").await.unwrap(), empty);

    let queue_ref = &queue;
    let age = poll_until("the oldest entry to age", PROMPT, move || async move {
        let depth = queue_ref.depth("a").await.map_err(|e| e.to_string())?;
        match depth.oldest_age {
            Some(age) if age >= Duration::from_millis(50) => Ok(age),
            _ => Err(format!("{depth:?}")),
        }
    })
    .await;
    assert!(age < Duration::from_mins(10), "an implausible age: {age:?}");

    // Delivered but not acked: still pending, still counted.
    let delivered = receive_now(&queue, &["a"], "a", 1).await;
    assert_eq!(ids(&delivered), vec![in_a[0].task_id]);
    assert_eq!(queue.pending_task_ids("a").await.unwrap(), in_a_ids);
    assert_eq!(queue.depth("a").await.unwrap().waiting, 3);

    queue.ack(&delivered[0]).await.unwrap();
    assert_eq!(
        queue.pending_task_ids("a").await.unwrap(),
        ids_of_entries(&in_a[1..]).into_iter().collect()
    );
    assert_eq!(queue.depth("a").await.unwrap().waiting, 2);
}

async fn ack_refuses_a_foreign_receipt(queue: Queue) {
    let stranger = Delivery {
        entry: entry("acks", 0),
        receipt: "not-a-receipt".to_owned(),
    };

    let refused = queue.ack(&stranger).await.unwrap_err();

    assert!(
        matches!(refused, QueueError::InvalidReceipt { .. }),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("not-a-receipt"), "{refused}");
}

// --- Redis only ---

#[tokio::test]
async fn redis_recovers_when_its_keys_vanish() {
    testsupport::needs_env!(Redis);
    with_redis_keyspace(|space| async move {
        let queue = redis_queue(&space).await;
        let before = entry("flushed", 0);
        queue.enqueue(&before).await.unwrap();
        assert_eq!(
            ids(&receive_now(&queue, &["flushed"], "a", 5).await),
            vec![before.task_id]
        );

        // What FLUSHALL does to this test's keys: streams and consumer groups are gone.
        space.clear().await.unwrap();
        assert!(queue.pending_task_ids("flushed").await.unwrap().is_empty());
        let after = entry("flushed", 0);
        queue.enqueue(&after).await.unwrap();
        assert_eq!(
            ids(&receive_now(&queue, &["flushed"], "a", 5).await),
            vec![after.task_id],
            "the consumer group is re-created on demand"
        );

        // The keys vanish under a blocked receive: it keeps waiting, then wakes.
        let mut waiting_receive = tokio::spawn({
            let queue = queue.clone();
            async move {
                queue
                    .receive(&names(&["flushed"]), "a", 5, LONG_BLOCK)
                    .await
            }
        });
        assert!(
            tokio::time::timeout(STILL_WAITING, &mut waiting_receive)
                .await
                .is_err()
        );
        space.clear().await.unwrap();
        assert!(
            tokio::time::timeout(STILL_WAITING, &mut waiting_receive)
                .await
                .is_err(),
            "receive returned when its streams vanished"
        );
        let last = entry("flushed", 0);
        queue.enqueue(&last).await.unwrap();
        let received = tokio::time::timeout(PROMPT, waiting_receive)
            .await
            .expect("a receive blocked across a flush never woke")
            .unwrap()
            .unwrap();
        assert_eq!(ids(&received), vec![last.task_id]);
    })
    .await;
}

#[tokio::test]
async fn redis_keys_stay_inside_the_prefix() {
    testsupport::needs_env!(Redis);
    with_redis_keyspace(|space| async move {
        let queue = redis_queue(&space).await;
        let name = format!("prefix-check-{}", TaskId::new().simple());
        for priority in [1, 0, -1] {
            queue.enqueue(&entry(&name, priority)).await.unwrap();
        }
        receive_now(&queue, &[name.as_str()], "a", 1).await;

        let mut connection = space.connection().await.unwrap();
        let mut keys = Vec::new();
        let mut cursor = 0_u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("*{name}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }

        assert_eq!(keys.len(), 3, "one stream per band: {keys:?}");
        for key in keys {
            assert!(
                key.starts_with(&space.prefix),
                "{key} is outside {}",
                space.prefix
            );
        }
    })
    .await;
}

#[tokio::test]
async fn redis_unreachable_is_unavailable() {
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let refused = RedisQueue::connect("redis://127.0.0.1:1", "test:unreachable:", GROUP)
        .await
        .unwrap_err();
    assert!(refused.is_unavailable(), "{refused:?}");

    let malformed = RedisQueue::connect("not a url", "test:malformed:", GROUP)
        .await
        .unwrap_err();
    assert!(
        matches!(malformed, QueueError::InvalidUrl { .. }),
        "{malformed:?}"
    );
}

/// A TCP proxy in front of Redis whose connections the test can break, to play a
/// server restart or a network cut without touching the shared server.
struct SeverableProxy {
    url: String,
    sever: tokio::sync::broadcast::Sender<()>,
}

impl SeverableProxy {
    async fn start(redis_url: &str) -> Self {
        let upstream = redis_url
            .strip_prefix("redis://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("expected redis://host:port, got {redis_url}"))
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let (sever, _) = tokio::sync::broadcast::channel(1);
        let severed = sever.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let mut severed = severed.subscribe();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = severed.recv() => {}
                    }
                });
            }
        });
        Self { url, sever }
    }

    /// Closes every connection open through the proxy; new ones still work.
    fn sever(&self) {
        let _ = self.sever.send(());
    }
}

#[tokio::test]
async fn redis_reconnects_after_its_connections_break() {
    testsupport::needs_env!(Redis);
    with_redis_keyspace(|space| async move {
        let proxy = SeverableProxy::start(&space.url).await;
        let queue: Queue = RedisQueue::connect(&proxy.url, &space.prefix, GROUP)
            .await
            .unwrap()
            .into();
        let before = entry("cut", 0);
        queue.enqueue(&before).await.unwrap();

        // A receive blocked on a connection that breaks fails; it does not hang.
        let mut waiting_receive = tokio::spawn({
            let queue = queue.clone();
            async move { queue.receive(&names(&["empty"]), "a", 5, LONG_BLOCK).await }
        });
        assert!(
            tokio::time::timeout(STILL_WAITING, &mut waiting_receive)
                .await
                .is_err()
        );
        proxy.sever();
        let broken = tokio::time::timeout(PROMPT, waiting_receive)
            .await
            .expect("a receive on a broken connection hung")
            .unwrap()
            .unwrap_err();
        assert!(broken.is_unavailable(), "{broken:?}");

        // The next calls open new connections.
        let queue_ref = &queue;
        poll_until("the queue to answer again", PROMPT, move || async move {
            queue_ref.ping().await.map_err(|e| e.to_string())
        })
        .await;
        let after = entry("cut", 0);
        queue.enqueue(&after).await.unwrap();
        let received =
            tokio::time::timeout(PROMPT, queue.receive(&names(&["cut"]), "a", 5, LONG_BLOCK))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(ids(&received), vec![before.task_id, after.task_id]);
    })
    .await;
}

#[tokio::test]
async fn redis_ping_answers() {
    testsupport::needs_env!(Redis);
    with_redis_keyspace(|space| async move {
        redis_queue(&space).await.ping().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn redis_forgets_the_idle_consumers_that_hold_nothing() {
    testsupport::needs_env!(Redis);
    with_redis_keyspace(|space| async move {
        let queue = redis_queue(&space).await;
        let name = format!("consumers-{}", TaskId::new().simple());
        let queues = names(&[name.as_str()]);
        for _ in 0..3 {
            queue.enqueue(&entry(&name, 0)).await.unwrap();
        }
        // "gone" read and acked (a launcher that exited cleanly), "crashed" holds a
        // delivery it never acked, "me" is the launcher asking.
        let acked = receive_now(&queue, &[name.as_str()], "gone", 1).await;
        queue.ack(&acked[0]).await.unwrap();
        receive_now(&queue, &[name.as_str()], "crashed", 1).await;
        let mine = receive_now(&queue, &[name.as_str()], "me", 1).await;
        queue.ack(&mine[0]).await.unwrap();

        // Nobody has been idle for an hour yet.
        assert_eq!(
            queue
                .forget_idle_consumers(&queues, "me", Duration::from_hours(1))
                .await
                .unwrap(),
            0
        );
        let forgotten = queue
            .forget_idle_consumers(&queues, "me", Duration::ZERO)
            .await
            .unwrap();
        assert!(forgotten >= 1, "{forgotten}");

        let mut connection = space.connection().await.unwrap();
        let key = format!("{}q:{name}:normal", space.prefix);
        let consumers: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&key)
            .arg(GROUP)
            .query_async(&mut connection)
            .await
            .unwrap();
        let mut left: Vec<(String, usize)> = consumers
            .consumers
            .into_iter()
            .map(|consumer| (consumer.name, consumer.pending))
            .collect();
        left.sort();
        // The one holding a delivery stays (its entry is claimed after 30 s, then it
        // goes too); the asker stays.
        assert_eq!(left, [("crashed".to_owned(), 1), ("me".to_owned(), 0)]);
        // Streams and groups that do not exist yet are no error.
        let unknown = names(&[&format!("never-used-{}", TaskId::new().simple())]);
        assert_eq!(
            queue
                .forget_idle_consumers(&unknown, "me", Duration::ZERO)
                .await
                .unwrap(),
            0
        );
    })
    .await;
}
