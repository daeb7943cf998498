//! Webhook delivery: the worker that empties the outbox the store fills in the
//! transaction of each state change ([`crate::store`]'s `webhook_deliveries`). Every
//! process runs one ([`Deliverer::run`]); deliveries are claimed under a lease, so each
//! is sent by one process at a time, and one whose sender died is sent again, with the
//! same `webhook-id`, once the lease ran out.
//!
//! Invariants:
//! - at least once: a delivery is closed only after a 2xx answer, after its retry period
//!   ([`DeliverySettings::retry_for`]) is over, or when its destination is refused;
//! - every attempt of a delivery sends the same body under the same `webhook-id`, signed
//!   with its own `webhook-timestamp` (Standard Webhooks, [`sign`]);
//! - the destination rules ([`crate::task::webhook`]) hold where the connection is made
//!   ([`client`]): a refused destination is a permanent failure, recorded on the delivery;
//! - bounded: [`BATCH`] deliveries per pass, a short timeout per request, no answer body
//!   read, at most [`crate::store::KEPT_ATTEMPTS`] attempts kept per delivery.

pub mod client;
pub mod sign;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::metrics::{DeliveryResult, Metrics};
use crate::store::{AfterAttempt, Claimed, DeliveryAttempt, Store, StoreError};
use crate::task::webhook::Destinations;

pub use client::{Client, Outcome};

/// Deliveries claimed per pass.
pub const BATCH: u32 = 16;

/// How often the outbox is read when it was found empty.
const POLL: Duration = Duration::from_millis(500);

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_hours(1);

/// How deliveries are sent and retried (the `--webhook-*` flags).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub destinations: Destinations,
    /// One request's timeout.
    pub timeout: Duration,
    /// How long after its state change a delivery is still tried.
    pub retry_for: Duration,
    /// The wait before the first retry (doubled for each next one).
    pub backoff: Duration,
    /// Certificates trusted for `https` besides the Mozilla roots (`--webhook-ca-file`).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            destinations: Destinations::default(),
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_hours(24),
            backoff: Duration::from_secs(5),
            extra_roots: Vec::new(),
        }
    }
}

impl DeliverySettings {
    /// How long a claim holds: longer than a pass can take (a name lookup and a request,
    /// each bounded by the timeout, and the writes).
    fn lease(&self) -> Duration {
        self.timeout * 3 + Duration::from_secs(10)
    }
}

/// The wait before attempt `attempts + 1` after `attempts` failed ones: `backoff`
/// doubled for each earlier failure, at most an hour, scaled by `jitter` (0 to 1) into
/// its upper half so that retries of many deliveries spread out.
#[must_use]
pub fn retry_delay(attempts: u32, backoff: Duration, jitter: f64) -> Duration {
    let doubled = backoff.saturating_mul(1 << attempts.saturating_sub(1).min(20));
    let delay = doubled.min(MAX_BACKOFF);
    delay.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// What follows a failed attempt made at `now`, the `attempts`th, of a delivery created
/// at `created`: another one after [`retry_delay`], or giving up when that would be past
/// `retry_for`.
#[must_use]
pub fn after_failure(
    created: jiff::Timestamp,
    now: jiff::Timestamp,
    attempts: u32,
    settings: &DeliverySettings,
    jitter: f64,
) -> AfterAttempt {
    let delay = retry_delay(attempts, settings.backoff, jitter);
    let next = jiff::SignedDuration::try_from(delay)
        .ok()
        .and_then(|delay| now.checked_add(delay).ok());
    let deadline = jiff::SignedDuration::try_from(settings.retry_for)
        .ok()
        .and_then(|period| created.checked_add(period).ok());
    match (next, deadline) {
        (Some(next), Some(deadline)) if next <= deadline => AfterAttempt::RetryAt(next),
        _ => AfterAttempt::GiveUp,
    }
}

/// Why the worker cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the webhook HTTP client's TLS settings: {0}")]
    Tls(#[from] rustls::Error),
}

/// Empties the outbox. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Deliverer {
    store: Store,
    metrics: Metrics,
    client: Client,
    settings: DeliverySettings,
}

impl Deliverer {
    pub fn new(store: Store, metrics: Metrics, settings: DeliverySettings) -> Result<Self, Error> {
        let client = Client::new(
            settings.destinations.clone(),
            settings.timeout,
            &settings.extra_roots,
        )?;
        Ok(Self {
            store,
            metrics,
            client,
            settings,
        })
    }

    /// Delivers what is due until `shutdown` turns true.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        while !*shutdown.borrow() {
            match self.deliver_due().await {
                // A full batch: more may be due, go on at once.
                Ok(count) if count == BATCH as usize => continue,
                Ok(_) => {}
                Err(error) => tracing::warn!(error = %error, "delivering webhooks failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// One pass: claims the deliveries due now (a bounded batch) and sends them, all at
    /// once. Returns how many were claimed.
    pub async fn deliver_due(&self) -> Result<usize, StoreError> {
        let claimed = self
            .store
            .claim_deliveries(jiff::Timestamp::now(), self.settings.lease(), BATCH)
            .await?;
        let count = claimed.len();
        let mut keys = BTreeMap::new();
        for delivery in &claimed {
            let tenant = &delivery.delivery.tenant;
            if !keys.contains_key(tenant) {
                let secret = self
                    .store
                    .webhook_secret(tenant, false, sign::new_secret)
                    .await?;
                keys.insert(tenant.clone(), sign::secret_key(&secret));
            }
        }
        let sends = claimed.into_iter().map(|claimed| {
            let key = keys.get(&claimed.delivery.tenant).cloned();
            async move {
                if let Err(error) = self.deliver(&claimed, key).await {
                    tracing::warn!(delivery = %claimed.delivery.id, error = %error, "recording a webhook attempt failed; it is sent again when its lease runs out");
                }
            }
        });
        futures::future::join_all(sends).await;
        Ok(count)
    }

    async fn deliver(
        &self,
        claimed: &Claimed,
        key: Option<Result<Vec<u8>, sign::SecretError>>,
    ) -> Result<(), StoreError> {
        let delivery = &claimed.delivery;
        let now = jiff::Timestamp::now();
        let timestamp = now.as_second();
        let (outcome, took) = match key {
            Some(Ok(key)) => {
                let signature =
                    sign::signature(&key, &delivery.id, timestamp, delivery.body.as_bytes());
                self.client
                    .send(client::Request {
                        url: &delivery.url,
                        id: &delivery.id,
                        timestamp,
                        signature: &signature,
                        body: &delivery.body,
                    })
                    .await
            }
            // Not sent unsigned: retried until an operator fixes (rotates) the secret.
            Some(Err(error)) => (
                Outcome::Failed {
                    status: None,
                    error: format!("not sent: {error}"),
                },
                Duration::ZERO,
            ),
            None => (
                Outcome::Failed {
                    status: None,
                    error: "not sent: the tenant has no webhook secret".to_owned(),
                },
                Duration::ZERO,
            ),
        };
        let attempts = delivery.attempts + 1;
        let (status_code, error, after, result) = match outcome {
            Outcome::Delivered { status } => (
                Some(status),
                None,
                AfterAttempt::Delivered,
                DeliveryResult::Delivered,
            ),
            Outcome::Failed { status, error } => {
                let after = after_failure(
                    delivery.created_at,
                    now,
                    attempts,
                    &self.settings,
                    rand::random::<f64>(),
                );
                let result = if after == AfterAttempt::GiveUp {
                    DeliveryResult::GivenUp
                } else {
                    DeliveryResult::Retried
                };
                (status, Some(error), after, result)
            }
            Outcome::Refused(why) => (
                None,
                Some(why),
                AfterAttempt::GiveUp,
                DeliveryResult::Refused,
            ),
        };
        let attempt = DeliveryAttempt {
            attempt: attempts,
            at: now,
            status_code,
            error,
            duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        };
        if self
            .store
            .finish_delivery_attempt(claimed, &attempt, after)
            .await?
        {
            self.metrics.webhooks().attempt(result);
            match after {
                AfterAttempt::Delivered => {
                    tracing::info!(delivery = %delivery.id, task_id = %delivery.task_id, event = %delivery.event_type, attempts, "webhook delivered");
                }
                AfterAttempt::RetryAt(next) => {
                    tracing::info!(delivery = %delivery.id, task_id = %delivery.task_id, attempts, error = ?attempt.error, next = %next, "webhook attempt failed; retried later");
                }
                AfterAttempt::GiveUp => {
                    tracing::warn!(delivery = %delivery.id, task_id = %delivery.task_id, attempts, error = ?attempt.error, "webhook delivery given up");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{AfterAttempt, DeliverySettings, after_failure, retry_delay};

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_an_hour() {
        let five = Duration::from_secs(5);
        assert_eq!(retry_delay(1, five, 1.0), five);
        assert_eq!(retry_delay(2, five, 1.0), Duration::from_secs(10));
        assert_eq!(retry_delay(4, five, 1.0), Duration::from_secs(40));
        assert_eq!(retry_delay(4, five, 0.0), Duration::from_secs(20));
        assert_eq!(retry_delay(30, five, 1.0), Duration::from_hours(1));
        assert_eq!(retry_delay(u32::MAX, five, 1.0), Duration::from_hours(1));
    }

    #[test]
    fn a_delivery_is_given_up_after_its_retry_period() {
        let settings = DeliverySettings {
            retry_for: Duration::from_mins(1),
            backoff: Duration::from_secs(10),
            ..DeliverySettings::default()
        };
        let created: jiff::Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
        let soon = created + jiff::SignedDuration::from_secs(5);
        assert_eq!(
            after_failure(created, soon, 1, &settings, 1.0),
            AfterAttempt::RetryAt(created + jiff::SignedDuration::from_secs(15))
        );
        let late = created + jiff::SignedDuration::from_secs(55);
        assert_eq!(
            after_failure(created, late, 3, &settings, 1.0),
            AfterAttempt::GiveUp
        );
    }
}
