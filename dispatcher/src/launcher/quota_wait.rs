//! Tasks the cluster has no room for. A create the namespace's ResourceQuota refuses
//! (403 "exceeded quota") leaves the task `launching` with reason `cluster_quota`; the
//! reconciler creates it again once its backoff has passed, and expires it once its queue
//! TTL has (it was never launched).
//!
//! Invariants:
//! - the backoff doubles with each refusal, from the stale-claim delay up to a cap, so a
//!   full namespace costs each waiting task one create per backoff, never a hot loop;
//! - the backoff lives in memory only: it decides *when* to try again, never *whether*
//!   (the store says that), so a restarted launcher merely tries once sooner.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::task::{Task, TaskId};

/// One waiting task's refusals so far and when to create again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub refusals: u32,
    pub next_try: jiff::Timestamp,
}

/// What to do now with a task that waits for room in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStep {
    /// Create its Job again.
    Retry,
    /// Not yet: its backoff runs.
    Wait,
    /// Its queue TTL ran out before it was launched.
    Expire,
}

/// The wait after `refusals` refusals in a row: `base`, doubling, at most `cap`.
#[must_use]
pub fn backoff(refusals: u32, base: Duration, cap: Duration) -> Duration {
    let doublings = refusals.saturating_sub(1).min(20);
    base.saturating_mul(1_u32 << doublings).min(cap)
}

/// What to do at `now` with a waiting task that expires at `expires_at`, given its `wait`
/// (`None`: this launcher has not seen it refused, for example after a restart).
#[must_use]
pub fn step(
    expires_at: Option<jiff::Timestamp>,
    wait: Option<&Wait>,
    now: jiff::Timestamp,
) -> WaitStep {
    if expires_at.is_some_and(|at| at <= now) {
        return WaitStep::Expire;
    }
    match wait {
        Some(wait) if wait.next_try > now => WaitStep::Wait,
        _ => WaitStep::Retry,
    }
}

/// The backoffs of the tasks this launcher saw refused. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct QuotaWaits {
    waits: Arc<Mutex<BTreeMap<TaskId, Wait>>>,
    base: Duration,
    cap: Duration,
}

impl QuotaWaits {
    /// Backoffs from `base` (the stale-claim delay) doubling up to `cap`.
    #[must_use]
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            waits: Arc::default(),
            base,
            cap: cap.max(base),
        }
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, BTreeMap<TaskId, Wait>> {
        // The map holds plain values: one a panicking holder left is still usable.
        self.waits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Task `id` was refused at `now`: its next wait.
    #[must_use]
    pub fn refused(&self, id: TaskId, now: jiff::Timestamp) -> Wait {
        let mut waits = self.waits();
        let refusals = waits.get(&id).map_or(0, |w| w.refusals).saturating_add(1);
        let delay = backoff(refusals, self.base, self.cap);
        let next_try = now
            .checked_add(jiff::SignedDuration::try_from(delay).unwrap_or_default())
            .unwrap_or(now);
        let wait = Wait { refusals, next_try };
        waits.insert(id, wait);
        wait
    }

    /// Task `id` was launched, or failed: it waits no more.
    pub fn clear(&self, id: TaskId) {
        self.waits().remove(&id);
    }

    /// What to do now with `task`, which waits for room.
    #[must_use]
    pub fn step(&self, task: &Task, now: jiff::Timestamp) -> WaitStep {
        step(task.expires_at, self.waits().get(&task.id), now)
    }

    /// Forgets the tasks not retried for a whole cap after they were due: they launched
    /// through another launcher, were cancelled or expired. A task that still waits is
    /// retried at least once a cap, so the map stays as large as the set of waiting tasks.
    pub fn forget_stale(&self, now: jiff::Timestamp) {
        let cap = jiff::SignedDuration::try_from(self.cap).unwrap_or_default();
        self.waits().retain(|_, wait| {
            wait.next_try
                .checked_add(cap)
                .is_ok_and(|until| until > now)
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.waits().len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{QuotaWaits, Wait, WaitStep, backoff, step};
    use crate::task::TaskId;

    fn at(seconds: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn the_backoff_doubles_from_the_base_up_to_the_cap() {
        let base = Duration::from_secs(15);
        let cap = Duration::from_mins(2);
        let cases = [
            (0, 15),
            (1, 15),
            (2, 30),
            (3, 60),
            (4, 120),
            (5, 120),
            (u32::MAX, 120),
        ];
        for (refusals, seconds) in cases {
            assert_eq!(
                backoff(refusals, base, cap),
                Duration::from_secs(seconds),
                "after {refusals} refusals"
            );
        }
    }

    #[test]
    fn a_waiting_task_retries_when_due_and_expires_past_its_ttl() {
        let waiting = Wait {
            refusals: 2,
            next_try: at(30),
        };
        let cases = [
            // (expires_at, wait, now, step)
            (None, Some(waiting), at(10), WaitStep::Wait),
            (None, Some(waiting), at(30), WaitStep::Retry),
            (None, Some(waiting), at(31), WaitStep::Retry),
            // Unknown to this launcher (it restarted): try once now.
            (None, None, at(10), WaitStep::Retry),
            (Some(at(20)), Some(waiting), at(10), WaitStep::Wait),
            (Some(at(20)), Some(waiting), at(20), WaitStep::Expire),
            (Some(at(20)), None, at(25), WaitStep::Expire),
        ];
        for (expires_at, wait, now, expected) in cases {
            assert_eq!(
                step(expires_at, wait.as_ref(), now),
                expected,
                "{expires_at:?} {wait:?} {now}"
            );
        }
    }

    #[test]
    fn refusals_count_up_and_clearing_or_retaining_forgets() {
        let waits = QuotaWaits::new(Duration::from_secs(2), Duration::from_secs(5));
        let (a, b) = (TaskId::new(), TaskId::new());
        assert_eq!(waits.refused(a, at(0)).next_try, at(2));
        assert_eq!(waits.refused(a, at(2)).next_try, at(6));
        let third = waits.refused(a, at(6));
        assert_eq!((third.refusals, third.next_try), (3, at(11)));
        let _ = waits.refused(b, at(0));
        waits.clear(a);
        assert_eq!(waits.refused(a, at(20)).refusals, 1);
        // b was due at 2: forgotten a cap (5 s) later; a (due at 22) is kept.
        waits.forget_stale(at(6));
        assert_eq!(waits.len(), 2);
        waits.forget_stale(at(7));
        assert_eq!(waits.len(), 1);
        assert_eq!(waits.refused(a, at(22)).refusals, 2);
    }
}
