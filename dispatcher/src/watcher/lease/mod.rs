//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go's
//! `leaderelection` does it. This module owns the I/O (reading and writing the Lease, the
//! renew loop); what to do with a Lease just read is decided by [`observed`], a pure
//! module.
//!
//! - A candidate remembers the last Lease record it saw and the time, on its own
//!   monotonic clock, it saw it change; the lease is free once that record has not changed
//!   for more than `leaseDurationSeconds`. Remote timestamps are never compared with the
//!   local clock, so replicas whose clocks disagree neither steal a live lease nor keep
//!   waiting on a dead one.
//! - The holder renews every retry period and stops leading when it has not renewed
//!   within the renew deadline (each write is cut off at that deadline too).
//! - Writes carry the resourceVersion that was read, so two replicas can never both win.
//! - The wall clock is read only to fill `acquireTime` and `renewTime`, which people and
//!   other tools read; it comes from a [`Clock`], so a test can skew it.
//!
//! Why our own code and not a crate: docs/adr/0006-maintained-crates-and-what-we-keep.md.

pub mod observed;

use std::sync::Arc;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::{Mutex, watch};

use observed::{Decision, Local, Observer, Record};
pub use observed::{Timing, TimingError};

/// The clocks an elector reads.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Wall-clock time, written into the Lease's `acquireTime` and `renewTime` (read by
    /// people and tools, never by the election itself).
    fn wall(&self) -> jiff::Timestamp;
    /// This process's monotonic clock: what observed times and the renew deadline are
    /// measured on.
    fn monotonic(&self) -> Local;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: std::time::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: std::time::Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn wall(&self) -> jiff::Timestamp {
        jiff::Timestamp::now()
    }

    fn monotonic(&self) -> Local {
        self.origin.elapsed()
    }
}

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (`holderIdentity`).
    pub identity: String,
    /// Lease duration, renew deadline and retry period.
    pub timing: Timing,
}

#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    clock: Arc<dyn Clock>,
    observer: Arc<Mutex<Observer>>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("config", &self.config)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

/// Outcome of one try.
#[derive(Debug)]
enum Attempt {
    Won,
    HeldByOther,
}

impl Elector {
    #[must_use]
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self::with_clock(client, config, Arc::new(SystemClock::default()))
    }

    /// An elector reading `clock` (a test skews its wall clock).
    #[must_use]
    pub fn with_clock(client: Client, config: LeaseConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            clock,
            observer: Arc::new(Mutex::new(Observer::default())),
        }
    }

    /// Waits until this replica holds the lease, then keeps renewing it in the background.
    /// The returned receiver changes once the lease is lost (or dropping it stops the
    /// renewals).
    pub async fn acquire(&self) -> Result<watch::Receiver<bool>, kube::Error> {
        let timing = self.config.timing;
        let mut renewed_at = loop {
            let started = self.clock.monotonic();
            match self.try_acquire().await {
                Ok(Attempt::Won) => break started,
                Ok(Attempt::HeldByOther) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error),
            }
            tokio::time::sleep(timing.retry_period()).await;
        };
        let (lost_sender, lost) = watch::channel(false);
        let elector = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(timing.retry_period()).await;
                if lost_sender.is_closed() {
                    return;
                }
                let started = elector.clock.monotonic();
                // No write may end after the renew deadline: a late success must not
                // extend a leadership this replica has already given up.
                let left = timing
                    .renew_deadline()
                    .saturating_sub(started.saturating_sub(renewed_at));
                match tokio::time::timeout(left, elector.try_acquire()).await {
                    Ok(Ok(Attempt::Won)) => renewed_at = started,
                    Ok(Ok(Attempt::HeldByOther)) => {
                        tracing::warn!("another replica holds the lease");
                        let _ = lost_sender.send(true);
                        return;
                    }
                    Ok(Err(error)) => tracing::warn!(error = %error, "renewing the lease failed"),
                    Err(_) => tracing::warn!("renewing the lease timed out"),
                }
                if !observed::keeps_leading(renewed_at, elector.clock.monotonic(), &timing) {
                    tracing::warn!(
                        renew_deadline = ?timing.renew_deadline(),
                        "no renewal within the renew deadline; giving the lease up"
                    );
                    let _ = lost_sender.send(true);
                    return;
                }
            }
        });
        Ok(lost)
    }

    async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let timing = self.config.timing;
        let identity = self.config.identity.as_str();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let now = self.clock.wall();
            let spec = LeaseSpec {
                holder_identity: Some(identity.to_owned()),
                lease_duration_seconds: Some(timing.duration_seconds()),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            };
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec.clone()),
            };
            self.api.create(&PostParams::default(), &lease).await?;
            self.observer
                .lock()
                .await
                .wrote(record(&spec), self.clock.monotonic());
            return Ok(Attempt::Won);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let decision = self.observer.lock().await.decide(
            &record(spec),
            identity,
            &timing,
            self.clock.monotonic(),
        );
        let now = self.clock.wall();
        match decision {
            Decision::Wait { holder, expires_in } => {
                tracing::debug!(%holder, ?expires_in, "the lease is held by another replica");
                return Ok(Attempt::HeldByOther);
            }
            Decision::Acquire => {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions =
                    Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                spec.holder_identity = Some(identity.to_owned());
            }
            Decision::Renew => {}
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(timing.duration_seconds());
        let written = record(spec);
        // replace() sends the resourceVersion we read: a concurrent writer makes it 409.
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await?;
        self.observer
            .lock()
            .await
            .wrote(written, self.clock.monotonic());
        Ok(Attempt::Won)
    }

    /// Gives the lease up on shutdown, so a standby takes over at once (an empty holder
    /// is free to every candidate).
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        if let Err(error) = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %error, "releasing the lease failed");
        }
    }
}

/// The election's view of a Lease's spec.
fn record(spec: &LeaseSpec) -> Record {
    Record {
        holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
        duration_seconds: spec.lease_duration_seconds,
        acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
        renew_time: spec.renew_time.as_ref().map(|t| t.0),
        transitions: spec.lease_transitions,
    }
}
