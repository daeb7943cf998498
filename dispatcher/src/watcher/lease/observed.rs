//! The decisions of leader election, as client-go's `leaderelection` makes them, without
//! I/O: pure functions of what was read from the Lease and of this process's own
//! monotonic clock, so they are table-tested over an injected clock.
//!
//! Invariants:
//! - a timestamp another process wrote (`renewTime`, `acquireTime`) is never compared
//!   with a local clock: it is only compared with the last value seen, to notice that the
//!   holder renewed. A lease held by another is expired only once the record has not
//!   changed for more than its `leaseDurationSeconds`, measured from when *this* process
//!   first saw it ([`Observer`]). Clocks that disagree by an hour change nothing;
//! - the holder stops leading once `renew_deadline` has passed since the start of its last
//!   successful renewal ([`keeps_leading`]); since `renew_deadline < duration`, and others
//!   count `duration` from when they saw that renewal (never earlier than it was sent), it
//!   has stopped before anyone may take over;
//! - [`Timing`] can only be built with `retry_period < renew_deadline < duration`.

use std::time::Duration;

/// A reading of this process's monotonic clock: the time since an arbitrary origin of
/// its own. Never compared with anything another process wrote.
pub type Local = Duration;

/// The three durations of an election (client-go's `LeaseDuration`, `RenewDeadline`,
/// `RetryPeriod`), checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
}

/// Why three durations make no election.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error(
        "--lease-duration must be a whole number of seconds from 1s (the Lease stores \
         seconds), not {0:?}"
    )]
    Duration(Duration),
    #[error("--lease-retry-period must be more than 0")]
    ZeroRetry,
    #[error(
        "--lease-renew-deadline {renew_deadline:?} must be less than --lease-duration \
         {duration:?}: the holder must give up before others may take over"
    )]
    DeadlineNotBelowDuration {
        renew_deadline: Duration,
        duration: Duration,
    },
    #[error(
        "--lease-retry-period {retry_period:?} must be less than --lease-renew-deadline \
         {renew_deadline:?}: the holder must get at least one retry"
    )]
    RetryNotBelowDeadline {
        retry_period: Duration,
        renew_deadline: Duration,
    },
}

impl Timing {
    /// Checks `retry_period < renew_deadline < duration`, `duration` in whole seconds.
    pub fn new(
        duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, TimingError> {
        if duration < Duration::from_secs(1)
            || duration.subsec_nanos() != 0
            || i32::try_from(duration.as_secs()).is_err()
        {
            return Err(TimingError::Duration(duration));
        }
        if retry_period.is_zero() {
            return Err(TimingError::ZeroRetry);
        }
        if renew_deadline >= duration {
            return Err(TimingError::DeadlineNotBelowDuration {
                renew_deadline,
                duration,
            });
        }
        if retry_period >= renew_deadline {
            return Err(TimingError::RetryNotBelowDeadline {
                retry_period,
                renew_deadline,
            });
        }
        Ok(Self {
            duration,
            renew_deadline,
            retry_period,
        })
    }

    /// A holder that has not renewed for this long (as others observe it) has lost the
    /// lease.
    #[must_use]
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The holder gives up leading once it has not renewed for this long.
    #[must_use]
    pub fn renew_deadline(&self) -> Duration {
        self.renew_deadline
    }

    /// How often the holder renews and the others try.
    #[must_use]
    pub fn retry_period(&self) -> Duration {
        self.retry_period
    }

    /// `leaseDurationSeconds` as written into the Lease (checked to fit by [`Self::new`]).
    #[must_use]
    pub fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }
}

impl Default for Timing {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The part of a Lease that says who holds it and that it was renewed (client-go's
/// `LeaderElectionRecord`). Timestamps are kept as written, for equality only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// `holderIdentity`; `None` when absent or empty (released).
    pub holder: Option<String>,
    pub duration_seconds: Option<i32>,
    pub acquire_time: Option<jiff::Timestamp>,
    pub renew_time: Option<jiff::Timestamp>,
    pub transitions: Option<i32>,
}

impl Record {
    /// How long the holder may go without renewing: the record's own
    /// `leaseDurationSeconds` (the holder's promise), else `fallback`.
    fn duration(&self, fallback: Duration) -> Duration {
        self.duration_seconds
            .and_then(|seconds| u64::try_from(seconds).ok())
            .filter(|seconds| *seconds > 0)
            .map_or(fallback, Duration::from_secs)
    }
}

/// What to do with the Lease just read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It is ours: write a new renew time.
    Renew,
    /// Nobody holds it, or its holder has not renewed for longer than the lease duration
    /// (on our clock): write ourselves as the holder.
    Acquire,
    /// Another holds it and renewed less than the lease duration ago (on our clock).
    Wait {
        holder: String,
        expires_in: Duration,
    },
}

/// The last record this process saw and when, on its own clock (client-go's
/// `observedRecord` and `observedTime`).
#[derive(Debug, Clone, Default)]
pub struct Observer {
    last: Option<(Record, Local)>,
}

impl Observer {
    /// Notes `record`, read at `now`, and decides. The observed time moves only when the
    /// record differs from the last one seen.
    pub fn decide(
        &mut self,
        record: &Record,
        identity: &str,
        timing: &Timing,
        now: Local,
    ) -> Decision {
        let observed_at = match &self.last {
            Some((last, at)) if last == record => *at,
            _ => {
                self.last = Some((record.clone(), now));
                now
            }
        };
        let Some(holder) = record.holder.as_deref() else {
            return Decision::Acquire;
        };
        if holder == identity {
            return Decision::Renew;
        }
        let duration = record.duration(timing.duration());
        let unchanged_for = now.saturating_sub(observed_at);
        if unchanged_for > duration {
            Decision::Acquire
        } else {
            Decision::Wait {
                holder: holder.to_owned(),
                expires_in: duration.saturating_sub(unchanged_for),
            }
        }
    }

    /// Notes the record this process wrote and the server accepted, at `now`.
    pub fn wrote(&mut self, record: Record, now: Local) {
        self.last = Some((record, now));
    }
}

/// Whether the holder still leads at `now`, having started its last successful renewal
/// at `renewed_at`.
#[must_use]
pub fn keeps_leading(renewed_at: Local, now: Local, timing: &Timing) -> bool {
    now.saturating_sub(renewed_at) < timing.renew_deadline()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Decision, Observer, Record, Timing, TimingError, keeps_leading};

    fn s(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    /// A record held by `holder`, renewed at `renewed` seconds after the epoch of the
    /// holder's clock.
    fn held(holder: &str, renewed: i64) -> Record {
        Record {
            holder: Some(holder.to_owned()),
            duration_seconds: Some(15),
            acquire_time: Some(jiff::Timestamp::UNIX_EPOCH),
            renew_time: jiff::Timestamp::from_second(renewed).ok(),
            transitions: Some(1),
        }
    }

    #[test]
    fn timing_is_checked() {
        assert_eq!(Timing::new(s(15), s(10), s(2)), Ok(Timing::default()));
        for (duration, deadline, retry, error) in [
            (s(0), s(0), s(0), TimingError::Duration(s(0))),
            (
                Duration::from_millis(1500),
                s(1),
                s(0),
                TimingError::Duration(Duration::from_millis(1500)),
            ),
            (s(15), s(10), s(0), TimingError::ZeroRetry),
            (
                s(15),
                s(15),
                s(2),
                TimingError::DeadlineNotBelowDuration {
                    renew_deadline: s(15),
                    duration: s(15),
                },
            ),
            (
                s(15),
                s(10),
                s(10),
                TimingError::RetryNotBelowDeadline {
                    retry_period: s(10),
                    renew_deadline: s(10),
                },
            ),
        ] {
            assert_eq!(Timing::new(duration, deadline, retry), Err(error));
        }
        let message = Timing::new(s(15), s(20), s(2)).unwrap_err().to_string();
        assert!(
            message.contains("--lease-renew-deadline 20s must be less than --lease-duration 15s"),
            "{message}"
        );
    }

    /// Each step: the record read, the local time of the read, the expected decision.
    fn run(identity: &str, steps: &[(Record, u64, Decision)]) {
        let timing = Timing::default();
        let mut observer = Observer::default();
        for (index, (record, at, expected)) in steps.iter().enumerate() {
            let decision = observer.decide(record, identity, &timing, s(*at));
            assert_eq!(&decision, expected, "step {index} at {at}s");
        }
    }

    fn wait(holder: &str, expires_in: u64) -> Decision {
        Decision::Wait {
            holder: holder.to_owned(),
            expires_in: s(expires_in),
        }
    }

    #[test]
    fn a_live_holder_is_waited_for_whatever_its_clock_says() {
        // The holder's clock an hour behind, an hour ahead, or right: its renew times are
        // only ever compared with each other.
        for base in [-3600, 0, 3600, 1_000_000_000] {
            run(
                "b",
                &[
                    (held("a", base), 0, wait("a", 15)),
                    (held("a", base), 10, wait("a", 5)),
                    (held("a", base + 2), 12, wait("a", 15)),
                    (held("a", base + 2), 27, wait("a", 0)),
                    (held("a", base + 4), 28, wait("a", 15)),
                ],
            );
        }
    }

    #[test]
    fn a_dead_holder_is_replaced_after_the_duration_on_our_clock() {
        // The last renewal was an hour "in the future" by our clock: no matter, it expires
        // 15 s after we last saw it change.
        let future = jiff::Timestamp::now().as_second() + 3600;
        run(
            "b",
            &[
                (held("a", future), 100, wait("a", 15)),
                (held("a", future), 115, wait("a", 0)),
                (held("a", future), 116, Decision::Acquire),
            ],
        );
        // An hour in the past by our clock: still 15 s from when we first saw it, not at once.
        let past = jiff::Timestamp::now().as_second() - 3600;
        run(
            "b",
            &[
                (held("a", past), 0, wait("a", 15)),
                (held("a", past), 16, Decision::Acquire),
            ],
        );
    }

    #[test]
    fn free_and_own_leases() {
        run("b", &[(Record::default(), 0, Decision::Acquire)]);
        run(
            "a",
            &[
                (held("a", 0), 0, Decision::Renew),
                (held("a", 0), 100, Decision::Renew),
            ],
        );
        let released = Record {
            holder: None,
            ..held("a", 5)
        };
        run(
            "b",
            &[
                (held("a", 0), 0, wait("a", 15)),
                (released, 1, Decision::Acquire),
            ],
        );
    }

    #[test]
    fn the_record_s_own_duration_counts() {
        let long = Record {
            duration_seconds: Some(60),
            ..held("a", 0)
        };
        run(
            "b",
            &[(long.clone(), 0, wait("a", 60)), (long, 59, wait("a", 1))],
        );
        let unset = Record {
            duration_seconds: None,
            ..held("a", 0)
        };
        run(
            "b",
            &[
                (unset.clone(), 0, wait("a", 15)),
                (unset, 16, Decision::Acquire),
            ],
        );
    }

    #[test]
    fn a_write_of_ours_restarts_the_observed_time() {
        let timing = Timing::default();
        let mut observer = Observer::default();
        observer.wrote(held("b", 50), s(10));
        // Another replica took over from us: we see its record at 12.
        assert_eq!(
            observer.decide(&held("a", 60), "b", &timing, s(12)),
            wait("a", 15)
        );
    }

    #[test]
    fn the_holder_gives_up_at_the_renew_deadline() {
        let timing = Timing::default();
        assert!(keeps_leading(s(100), s(100), &timing));
        assert!(keeps_leading(s(100), s(109), &timing));
        assert!(!keeps_leading(s(100), s(110), &timing));
        // Before any other replica may take over (duration after it saw the renewal).
        assert!(timing.renew_deadline() < timing.duration());
    }
}
