//! The shared poller of followed event streams (`events?follow=true`): one loop per
//! process reads the new events of every followed task in one store read per tick and
//! fans them out, instead of each stream polling the store on its own (a few hundred
//! streams used to make a few hundred queries every 250 ms against a pool of 16).
//!
//! What it owns: the followed tasks (each with the last event id it published and a
//! bounded broadcast channel), and the polling loop, which runs while at least one
//! stream is subscribed and ends by itself when the last one goes.
//!
//! Invariants:
//! - a subscriber gets every event of its task after its cursor exactly once, in id
//!   order: it subscribes before it reads the task's history from the store, and skips
//!   what the channel repeats (ids at or below its cursor);
//! - memory is bounded whatever a subscriber does: a channel holds at most
//!   [`CHANNEL_CAPACITY`] events; a subscriber that falls further behind is told it
//!   lagged and reads what it missed from the store by its own cursor;
//! - one store read per tick serves up to [`FOLLOWED_PER_READ`] followed tasks, however
//!   many streams follow them; the tasks nobody follows any more are dropped at the next
//!   tick;
//! - output lines and progress are read by each stream by its own cursor (they are the
//!   stream's payload), but only when its task's output mark moved: one more store read
//!   per tick reads the marks of every task whose output is followed
//!   ([`Store::output_marks`]), so an idle followed stream costs no query of its own.
//!   A mark is taken before the stream's read, so a line stored after it moves the mark
//!   again and is read at the next tick.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, watch};

use crate::store::{OutputMark, Store, StoreError, TaskEvent};
use crate::task::TaskId;

/// Events a followed task's channel keeps for its slowest subscriber before that one is
/// told it lagged (and reads the rest from the store).
pub const CHANNEL_CAPACITY: usize = 64;
/// The most rows one store read of the loop returns; a full read is followed by the
/// next one at once, without waiting for the tick.
const ROWS_PER_READ: u32 = 1000;
pub use crate::store::FOLLOWED_PER_READ;

/// The handle on the process's shared poller; clones share it.
#[derive(Debug, Clone)]
pub struct EventFeed {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    /// How long the loop waits between reads.
    tick: Duration,
    followed: Mutex<Followed>,
}

#[derive(Debug, Default)]
struct Followed {
    tasks: HashMap<TaskId, Channel>,
    /// Whether the loop runs: set by the first subscriber, cleared by the loop when it
    /// finds nobody subscribed (both under the lock, so a subscriber never waits on a
    /// loop that is ending).
    polling: bool,
}

#[derive(Debug)]
struct Channel {
    /// The last event id published (0 before the first read, which then publishes the
    /// whole history; subscribers skip what they already read).
    published: i64,
    sender: broadcast::Sender<Arc<TaskEvent>>,
    /// The task's output mark as last read (`None` before the first read), for the
    /// streams that follow its lines or progress.
    output: watch::Sender<Option<OutputMark>>,
}

impl Channel {
    fn new() -> Self {
        Self {
            published: 0,
            sender: broadcast::channel(CHANNEL_CAPACITY).0,
            output: watch::channel(None).0,
        }
    }

    fn followed(&self) -> bool {
        self.sender.receiver_count() > 0 || self.output.receiver_count() > 0
    }
}

impl EventFeed {
    /// A feed reading `store` every `tick` while anything is followed. Nothing runs until
    /// the first subscriber.
    #[must_use]
    pub fn new(store: Store, tick: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                tick,
                followed: Mutex::new(Followed::default()),
            }),
        }
    }

    /// Follows `task`'s events after `after` (the last id the caller has; `None` for the
    /// whole history). Starts the loop if it is not running.
    #[must_use]
    pub fn subscribe(&self, task: TaskId, after: Option<i64>) -> EventSubscription {
        let receiver = self.with_channel(task, |channel| channel.sender.subscribe());
        EventSubscription {
            store: self.inner.store.clone(),
            task,
            after: after.unwrap_or(0),
            receiver,
            // The history is read once, after subscribing: what the loop published before
            // is in it, what it publishes after is in the channel.
            behind: true,
            received: VecDeque::new(),
        }
    }

    /// Follows `task`'s output mark: whether its lines or progress are worth a read.
    /// Starts the loop if it is not running.
    #[must_use]
    pub fn follow_output(&self, task: TaskId) -> OutputFollow {
        OutputFollow {
            receiver: self.with_channel(task, |channel| channel.output.subscribe()),
            read_at: None,
        }
    }

    /// Runs `then` on `task`'s channel (made if new), and starts the loop if it is not
    /// running; under the lock, so the loop never ends between the two.
    fn with_channel<T>(&self, task: TaskId, then: impl FnOnce(&Channel) -> T) -> T {
        let mut followed = self
            .inner
            .followed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let out = then(followed.tasks.entry(task).or_insert_with(Channel::new));
        if !followed.polling {
            followed.polling = true;
            tokio::spawn(poll(Arc::clone(&self.inner)));
        }
        out
    }

    /// The tasks followed now (those with a subscriber, or left since the last tick).
    #[must_use]
    pub fn followed_tasks(&self) -> usize {
        self.inner
            .followed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tasks
            .len()
    }
}

/// The loop: while anything is followed, one read of every followed task's new events
/// per tick, published to each task's channel.
async fn poll(inner: Arc<Inner>) {
    loop {
        let (cursors, outputs): (Vec<(TaskId, i64)>, Vec<TaskId>) = {
            let mut followed = inner
                .followed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            followed.tasks.retain(|_, channel| channel.followed());
            if followed.tasks.is_empty() {
                followed.polling = false;
                return;
            }
            let cursors = followed
                .tasks
                .iter()
                .filter(|(_, channel)| channel.sender.receiver_count() > 0)
                .map(|(task, channel)| (*task, channel.published))
                .collect();
            let outputs = followed
                .tasks
                .iter()
                .filter(|(_, channel)| channel.output.receiver_count() > 0)
                .map(|(task, _)| *task)
                .collect();
            (cursors, outputs)
        };
        if !outputs.is_empty() {
            let marks: Vec<(TaskId, Option<OutputMark>)> = match inner
                .store
                .output_marks(&outputs)
                .await
            {
                Ok(marks) => marks
                    .into_iter()
                    .map(|(task, mark)| (task, Some(mark)))
                    .collect(),
                Err(error) => {
                    // No mark: the streams read on their own clock until marks come back.
                    tracing::warn!(error = %error, tasks = outputs.len(), "event feed: reading output marks failed");
                    outputs.iter().map(|task| (*task, None)).collect()
                }
            };
            let followed = inner
                .followed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (task, mark) in marks {
                if let Some(channel) = followed.tasks.get(&task) {
                    channel.output.send_if_modified(|held| {
                        let moved = *held != mark;
                        *held = mark;
                        moved
                    });
                }
            }
        }
        let mut more = false;
        // Only output may be followed: then no events to read.
        let events = if cursors.is_empty() {
            Ok(Vec::new())
        } else {
            inner
                .store
                .events_of_followed(&cursors, ROWS_PER_READ)
                .await
        };
        match events {
            Ok(events) => {
                more = events.len() >= ROWS_PER_READ as usize;
                let mut followed = inner
                    .followed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                for event in events {
                    if let Some(channel) = followed.tasks.get_mut(&event.task_id)
                        && event.id > channel.published
                    {
                        channel.published = event.id;
                        // No receiver left is fine: the task is dropped at the next tick.
                        let _ = channel.sender.send(Arc::new(event));
                    }
                }
            }
            Err(error) => {
                // The subscribers keep waiting; the next tick reads again.
                tracing::warn!(error = %error, tasks = cursors.len(), "event feed: reading followed events failed");
            }
        }
        if !more {
            tokio::time::sleep(inner.tick).await;
        }
    }
}

/// One followed stream's place on the feed: its task's events after its cursor.
#[derive(Debug)]
pub struct EventSubscription {
    store: Store,
    task: TaskId,
    /// The last event id handed out.
    after: i64,
    receiver: broadcast::Receiver<Arc<TaskEvent>>,
    /// Whether the channel may miss events this subscription has not seen: before the
    /// first read of the history, and after the channel dropped some (it lagged).
    behind: bool,
    /// Events [`EventSubscription::wait`] received, not yet handed out.
    received: VecDeque<Arc<TaskEvent>>,
}

impl EventSubscription {
    /// The task's events after the cursor that arrived so far, in order, without waiting
    /// for more; reads the store only for the history and after a lag. A store error is
    /// returned only when nothing could be handed out; either way nothing is lost: the
    /// next call reads again from the cursor.
    pub async fn take(&mut self) -> Result<Vec<TaskEvent>, StoreError> {
        let mut events = Vec::new();
        loop {
            // The store first: the channel's events are newer than what it may have
            // missed, and the cursor only moves forward.
            if self.behind {
                match self.store.events(self.task, Some(self.after)).await {
                    Ok(missed) => {
                        self.behind = false;
                        for event in &missed {
                            self.hand_out(event, &mut events);
                        }
                    }
                    Err(error) if events.is_empty() => return Err(error),
                    Err(_) => return Ok(events),
                }
            }
            let next = match self.received.pop_front() {
                Some(event) => Ok(event),
                None => self.receiver.try_recv(),
            };
            match next {
                Ok(event) => self.hand_out(&event, &mut events),
                Err(TryRecvError::Empty) => return Ok(events),
                Err(TryRecvError::Lagged(_)) => self.behind = true,
                // The feed keeps a channel while it has receivers, so this is not
                // reached; were it, the store still has every event: read it each time.
                Err(TryRecvError::Closed) => {
                    self.behind = true;
                    return Ok(events);
                }
            }
        }
    }

    /// Waits at most `timeout` for the feed to publish an event of the task (kept for
    /// [`EventSubscription::take`]); returns at once if one is waiting.
    pub async fn wait(&mut self, timeout: Duration) {
        if !self.received.is_empty() {
            return;
        }
        match tokio::time::timeout(timeout, self.receiver.recv()).await {
            Ok(Ok(event)) => self.received.push_back(event),
            Ok(Err(RecvError::Lagged(_))) => self.behind = true,
            Ok(Err(RecvError::Closed)) => {
                self.behind = true;
                tokio::time::sleep(timeout).await;
            }
            Err(_elapsed) => {}
        }
    }

    fn hand_out(&mut self, event: &TaskEvent, events: &mut Vec<TaskEvent>) {
        // The channel repeats what the history read already handed out.
        if event.id > self.after {
            self.after = event.id;
            events.push(event.clone());
        }
    }
}

/// One stream's view of its task's output mark ([`EventFeed::follow_output`]).
#[derive(Debug)]
pub struct OutputFollow {
    receiver: watch::Receiver<Option<OutputMark>>,
    /// The mark when the stream last read its lines and progress.
    read_at: Option<OutputMark>,
}

impl OutputFollow {
    /// Whether the stream should read its task's lines and progress now: the mark moved
    /// since its last read, or no mark is known (before the feed's first read, or while
    /// it fails). Call it just before the read: it takes the mark the read covers.
    pub fn worth_reading(&mut self) -> bool {
        let now = *self.receiver.borrow_and_update();
        let worth = now.is_none() || now != self.read_at;
        self.read_at = now;
        worth
    }

    /// After a read that failed or stopped at a page: the next call says read.
    pub fn read_again(&mut self) {
        self.read_at = None;
    }
}
