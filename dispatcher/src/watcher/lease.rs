//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go does it: the
//! holder renews the lease every few seconds; another replica takes it over only once
//! the holder's renew time is older than the lease duration. Writes use the object's
//! resourceVersion, so two replicas can never both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (`holderIdentity`).
    pub identity: String,
    /// A holder that has not renewed for this long has lost the lease.
    pub duration: Duration,
    /// How often the holder renews, and others retry.
    pub renew_every: Duration,
}

#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Outcome of one try.
enum Attempt {
    Won,
    HeldByOther,
}

impl Elector {
    #[must_use]
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    /// Waits until this replica holds the lease, then keeps renewing it in the background.
    /// The returned receiver changes once the lease is lost.
    pub async fn acquire(&self) -> Result<watch::Receiver<bool>, kube::Error> {
        loop {
            match self.try_acquire().await {
                Ok(Attempt::Won) => break,
                Ok(Attempt::HeldByOther) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error),
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
        let (lost_sender, lost) = watch::channel(false);
        let elector = self.clone();
        tokio::spawn(async move {
            let mut last_renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(elector.config.renew_every).await;
                if lost_sender.is_closed() {
                    return;
                }
                match elector.try_acquire().await {
                    Ok(Attempt::Won) => last_renewed = tokio::time::Instant::now(),
                    Ok(Attempt::HeldByOther) => {
                        let _ = lost_sender.send(true);
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "renewing the lease failed");
                        if last_renewed.elapsed() >= elector.config.duration {
                            let _ = lost_sender.send(true);
                            return;
                        }
                    }
                }
            }
        });
        Ok(lost)
    }

    async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = jiff::Timestamp::now();
        let duration_seconds = i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            self.api.create(&PostParams::default(), &lease).await?;
            return Ok(Attempt::Won);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.config.identity.as_str());
        let held = spec
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty());
        let expired = spec.renew_time.as_ref().is_none_or(|renewed| {
            let held_for = spec
                .lease_duration_seconds
                .map_or(self.config.duration, |s| {
                    Duration::from_secs(u64::from(s.unsigned_abs()))
                });
            now.duration_since(renewed.0)
                > jiff::SignedDuration::try_from(held_for).unwrap_or_default()
        });
        if held && !ours && !expired {
            return Ok(Attempt::HeldByOther);
        }
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.config.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(duration_seconds);
        // replace() sends the resourceVersion we read: a concurrent writer makes it 409.
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await?;
        Ok(Attempt::Won)
    }

    /// Gives the lease up on shutdown, so a standby takes over at once.
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
