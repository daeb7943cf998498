use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use super::{Band, Inner, RedisQueue, parse_id};
use crate::queue::{Delivery, QueueEntry};
use crate::task::TaskId;

/// A queue that never connects (`Client::open` only parses the URL).
fn unconnected() -> RedisQueue {
    RedisQueue {
        inner: Arc::new(Inner {
            client: redis::Client::open("redis://127.0.0.1:1").unwrap(),
            prefix: "unit:".to_owned(),
            group: "launchers".to_owned(),
            commands: Mutex::new(None),
            blocking: Mutex::new(Vec::new()),
            overflow: Mutex::new(HashMap::new()),
            rotation: AtomicUsize::new(0),
        }),
    }
}

fn delivery(queue: &str, receipt: &str) -> Delivery {
    Delivery {
        entry: QueueEntry {
            task_id: TaskId::new(),
            queue: queue.to_owned(),
            priority: 0,
        },
        receipt: receipt.to_owned(),
    }
}

#[test]
fn deliveries_beyond_max_wait_for_the_same_consumer() {
    let queue = unconnected();
    let read = vec![
        delivery("a", "1-0"),
        delivery("b", "2-0"),
        delivery("a", "3-0"),
    ];

    let handed = queue.hand_out("c1", read.clone(), 1);

    assert_eq!(handed.len(), 1);
    assert_eq!(handed[0].receipt, "1-0");
    assert!(queue.take_overflow("c2", &["a", "b"], 10).is_empty());
    let only_a = queue.take_overflow("c1", &["a"], 10);
    assert_eq!(only_a.len(), 1);
    assert_eq!(only_a[0].receipt, "3-0");
    let rest = queue.take_overflow("c1", &["a", "b"], 10);
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].receipt, "2-0");
    assert!(queue.take_overflow("c1", &["a", "b"], 10).is_empty());
}

#[test]
fn keys_are_prefixed_per_queue_and_band() {
    let queue = unconnected();
    assert_eq!(queue.key("gpu", Band::High), "unit:q:gpu:high");
    assert_eq!(queue.key("default", Band::Low), "unit:q:default:low");
}

#[test]
fn bands_split_at_zero_and_read_high_first() {
    assert_eq!(Band::of(7), Band::High);
    assert_eq!(Band::of(1), Band::High);
    assert_eq!(Band::of(0), Band::Normal);
    assert_eq!(Band::of(-1), Band::Low);
    assert_eq!(Band::of(i32::MIN), Band::Low);
    assert!(Band::High < Band::Normal && Band::Normal < Band::Low);
}

#[test]
fn stream_ids_parse_and_order_numerically() {
    assert_eq!(parse_id("1700000000000-3"), Some((1_700_000_000_000, 3)));
    assert!(parse_id("9-10") > parse_id("9-9"));
    assert_eq!(parse_id("memory:3"), None);
    assert_eq!(parse_id("1-x"), None);
}
