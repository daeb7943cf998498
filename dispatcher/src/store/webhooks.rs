//! The webhook outbox and the tenants' webhook settings: a delivery row is written in the
//! transaction of the state change it tells of ([`enqueue_delivery`], called by
//! [`Store::transition`]), claimed by one sender at a time under a lease
//! ([`Store::claim_deliveries`]), and closed or rescheduled with the attempt it made
//! ([`Store::finish_delivery_attempt`]). What a delivery says and when it is retried are
//! decided elsewhere ([`crate::lifecycle`] renders the body, [`crate::webhooks`] sends and
//! schedules); this module only persists.
//!
//! Invariants:
//! - a delivery's id and body never change after the insert: every attempt sends the
//!   same bytes under the same `webhook-id`;
//! - a delivery is sent by at most one sender at a time: the claim is a compare-and-set
//!   on an expired (or absent) lease, and an attempt is recorded only under the lease
//!   that claimed it; a sender that dies leaves the lease to expire and the delivery is
//!   sent again;
//! - at most [`KEPT_ATTEMPTS`] attempts are kept per delivery (the latest), the count of
//!   all of them is on the delivery.

use sqlx::any::AnyRow;
use sqlx::{Any, Transaction};

use super::row::{self, get, millis};
use super::{During as _, Result, Store, StoreError};
use crate::task::webhook::{WebhookEvent, WebhookSpec, event_of};
use crate::task::{Task, TaskId, TaskState};

/// The attempts kept per delivery.
pub const KEPT_ATTEMPTS: u32 = 20;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not yet delivered; retried until it is, or until it is given up.
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Given up: retried for too long, or its destination is refused.
    Failed,
}

impl DeliveryState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}

impl std::str::FromStr for DeliveryState {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| format!("unknown delivery state '{text}'"))
    }
}

/// One notification of one state change to one URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// `msg_…`: the `webhook-id` of every attempt.
    pub id: String,
    pub task_id: TaskId,
    pub tenant: String,
    /// `task.succeeded`, …
    pub event_type: String,
    pub url: String,
    /// The JSON body, as sent.
    pub body: String,
    pub state: DeliveryState,
    pub created_at: jiff::Timestamp,
    pub next_attempt_at: jiff::Timestamp,
    pub attempts: u32,
    pub delivered_at: Option<jiff::Timestamp>,
    pub given_up_at: Option<jiff::Timestamp>,
    pub last_error: Option<String>,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryAttempt {
    pub attempt: u32,
    pub at: jiff::Timestamp,
    /// The HTTP status of the answer, if one came.
    pub status_code: Option<u16>,
    /// Why no 2xx came: the transport error, the refusal, or the status.
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// It was delivered.
    Delivered,
    /// Try again at this time.
    RetryAt(jiff::Timestamp),
    /// Never again (tried for too long, or the destination is refused).
    GiveUp,
}

/// A delivery claimed by one sender: it holds the lease until it records the attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub delivery: Delivery,
    pub lease_token: String,
}

macro_rules! delivery_columns {
    () => {
        "id, task_id, tenant, event_type, url, body, state, created_at, next_attempt_at, \
         attempts, delivered_at, given_up_at, last_error"
    };
}

fn delivery(row: &AnyRow) -> Result<Delivery> {
    let id: String = get(row, "id", &|| "webhook delivery".to_owned())?;
    let record = || format!("webhook delivery {id}");
    let optional_time = |column: &str| -> Result<Option<jiff::Timestamp>> {
        get::<Option<i64>>(row, column, &record)?
            .map(|at| row::timestamp(at, &record))
            .transpose()
    };
    Ok(Delivery {
        task_id: row::parse(&get::<String>(row, "task_id", &record)?, "task_id", &record)?,
        tenant: get(row, "tenant", &record)?,
        event_type: get(row, "event_type", &record)?,
        url: get(row, "url", &record)?,
        body: get(row, "body", &record)?,
        state: row::parse(&get::<String>(row, "state", &record)?, "state", &record)?,
        created_at: row::timestamp(get(row, "created_at", &record)?, &record)?,
        next_attempt_at: row::timestamp(get(row, "next_attempt_at", &record)?, &record)?,
        attempts: u32::try_from(get::<i32>(row, "attempts", &record)?).unwrap_or(0),
        delivered_at: optional_time("delivered_at")?,
        given_up_at: optional_time("given_up_at")?,
        last_error: get(row, "last_error", &record)?,
        id: id.clone(),
    })
}

/// Writes, in `tx` (the transaction of the change that brought `task` from `from` to its
/// state), the delivery that change makes, if it is an event the task's webhook (or else
/// its tenant's default one) wants. `render` makes the body from the task and the event
/// type. Returns the delivery id.
pub(super) async fn enqueue_delivery(
    tx: &mut Transaction<'static, Any>,
    from: TaskState,
    task: &Task,
    at: i64,
    render: &(dyn Fn(&Task, &'static str) -> String + Sync),
) -> std::result::Result<Option<String>, sqlx::Error> {
    let Some((event, event_type)) = event_of(from, task.state) else {
        return Ok(None);
    };
    let target = if let Some(webhook) = &task.spec.webhook {
        Some(webhook.clone())
    } else {
        sqlx::query("SELECT webhook_url, webhook_events FROM tenants WHERE name = $1")
            .bind(&task.tenant)
            .fetch_optional(&mut **tx)
            .await?
            .and_then(|row| tenant_webhook_of(&row))
    };
    let Some(target) = target.filter(|target| target.wants(event)) else {
        return Ok(None);
    };
    let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(
        "INSERT INTO webhook_deliveries \
         (id, task_id, tenant, event_type, url, body, state, created_at, next_attempt_at, attempts) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, 0)",
    )
    .bind(&id)
    .bind(task.id.to_string())
    .bind(&task.tenant)
    .bind(event_type)
    .bind(&target.url)
    .bind(render(task, event_type))
    .bind(DeliveryState::Pending.as_str())
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(Some(id))
}

/// The default webhook in a row of `webhook_url, webhook_events`; unknown event names
/// (none are written) are skipped.
fn tenant_webhook_of(row: &AnyRow) -> Option<WebhookSpec> {
    use sqlx::Row as _;
    let url: Option<String> = row.try_get("webhook_url").ok().flatten();
    let events: Option<String> = row.try_get("webhook_events").ok().flatten();
    let events: Vec<WebhookEvent> = events
        .and_then(|json| serde_json::from_str::<Vec<String>>(&json).ok())
        .unwrap_or_default()
        .iter()
        .filter_map(|name| name.parse().ok())
        .collect();
    url.map(|url| WebhookSpec {
        url,
        events: if events.is_empty() {
            vec![WebhookEvent::Terminal]
        } else {
            events
        },
    })
}

impl Store {
    /// Sets (or with `None` clears) the default webhook of `name`'s tasks.
    /// [`StoreError::UnknownTenant`] if there is no such tenant.
    pub async fn set_tenant_webhook(
        &self,
        name: &str,
        webhook: Option<&WebhookSpec>,
    ) -> Result<()> {
        self.timed("set_tenant_webhook", async {
            let events = webhook.map(|webhook| {
                serde_json::to_string(
                    &webhook
                        .events
                        .iter()
                        .map(|e| e.as_str())
                        .collect::<Vec<_>>(),
                )
                .unwrap_or_else(|_| "[\"terminal\"]".to_owned())
            });
            let updated = sqlx::query(
                "UPDATE tenants SET webhook_url = $2, webhook_events = $3 WHERE name = $1",
            )
            .bind(name)
            .bind(webhook.map(|webhook| webhook.url.clone()))
            .bind(events)
            .execute(&self.pool)
            .await
            .during(|| format!("setting the webhook of tenant '{name}'"))?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::UnknownTenant {
                    tenant: name.to_owned(),
                });
            }
            Ok(())
        })
        .await
    }

    /// The default webhook of `name`'s tasks. [`StoreError::UnknownTenant`] if there is no
    /// such tenant.
    pub async fn tenant_webhook(&self, name: &str) -> Result<Option<WebhookSpec>> {
        self.timed("tenant_webhook", async {
            let row =
                sqlx::query("SELECT webhook_url, webhook_events FROM tenants WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .during(|| format!("reading the webhook of tenant '{name}'"))?;
            let row = row.ok_or_else(|| StoreError::UnknownTenant {
                tenant: name.to_owned(),
            })?;
            Ok(tenant_webhook_of(&row))
        })
        .await
    }

    /// The webhook signing secret of `name`: the stored one, or `generate()` stored first
    /// when it has none or `rotate`. [`StoreError::UnknownTenant`] if there is no such
    /// tenant.
    pub async fn webhook_secret(
        &self,
        name: &str,
        rotate: bool,
        generate: impl FnOnce() -> String + Send,
    ) -> Result<String> {
        self.timed("webhook_secret", async {
            let during = || format!("making the webhook secret of tenant '{name}'");
            let fresh = generate();
            let sql = if rotate {
                "UPDATE tenants SET webhook_secret = $2 WHERE name = $1"
            } else {
                "UPDATE tenants SET webhook_secret = $2 WHERE name = $1 AND webhook_secret IS NULL"
            };
            sqlx::query(sql)
                .bind(name)
                .bind(&fresh)
                .execute(&self.pool)
                .await
                .during(during)?;
            self.tenant_webhook_secret(name)
                .await?
                .ok_or_else(|| StoreError::UnknownTenant {
                    tenant: name.to_owned(),
                })
        })
        .await
    }

    /// The webhook signing secret of `name`, if it has one (`None` too for no tenant).
    pub async fn tenant_webhook_secret(&self, name: &str) -> Result<Option<String>> {
        let secret: Option<Option<String>> =
            sqlx::query_scalar("SELECT webhook_secret FROM tenants WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .during(|| format!("reading the webhook secret of tenant '{name}'"))?;
        Ok(secret.flatten())
    }

    /// Claims up to `limit` deliveries due by `now` whose lease (if any) ran out, for
    /// `lease`: a compare-and-set, so concurrent senders never claim the same one.
    pub async fn claim_deliveries(
        &self,
        now: jiff::Timestamp,
        lease: std::time::Duration,
        limit: u32,
    ) -> Result<Vec<Claimed>> {
        self.timed("claim_deliveries", async {
            let token = uuid::Uuid::new_v4().simple().to_string();
            let now_ms = millis(now);
            let until = now_ms.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
            let rows = sqlx::query(concat!(
                "UPDATE webhook_deliveries SET lease_token = $1, lease_until = $2 \
                 WHERE id IN (SELECT id FROM webhook_deliveries \
                   WHERE state = $3 AND next_attempt_at <= $4 \
                   AND (lease_until IS NULL OR lease_until <= $4) \
                   ORDER BY next_attempt_at LIMIT $5) \
                 AND state = $3 AND (lease_until IS NULL OR lease_until <= $4) \
                 RETURNING ",
                delivery_columns!()
            ))
            .bind(&token)
            .bind(until)
            .bind(DeliveryState::Pending.as_str())
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .during(|| "claiming webhook deliveries".to_owned())?;
            rows.iter()
                .map(|row| {
                    Ok(Claimed {
                        delivery: delivery(row)?,
                        lease_token: token.clone(),
                    })
                })
                .collect()
        })
        .await
    }

    /// Records `attempt` of the delivery `claimed` and what follows it, if the claim's
    /// lease still holds (`false`: another sender took it over, nothing written).
    pub async fn finish_delivery_attempt(
        &self,
        claimed: &Claimed,
        attempt: &DeliveryAttempt,
        after: AfterAttempt,
    ) -> Result<bool> {
        let id = &claimed.delivery.id;
        self.timed("finish_delivery_attempt", async {
            let during = || format!("recording an attempt of webhook delivery {id}");
            let at = millis(attempt.at);
            let (state, next, delivered, given_up) = match after {
                AfterAttempt::Delivered => (DeliveryState::Delivered, at, Some(at), None),
                AfterAttempt::RetryAt(next) => (DeliveryState::Pending, millis(next), None, None),
                AfterAttempt::GiveUp => (DeliveryState::Failed, at, None, Some(at)),
            };
            let mut tx = self.begin_write().await.during(during)?;
            let attempts: Option<i32> = sqlx::query_scalar(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, lease_token = NULL, \
                 lease_until = NULL, state = $3, next_attempt_at = $4, delivered_at = $5, \
                 given_up_at = $6, last_error = $7 \
                 WHERE id = $1 AND lease_token = $2 RETURNING attempts",
            )
            .bind(id)
            .bind(&claimed.lease_token)
            .bind(state.as_str())
            .bind(next)
            .bind(delivered)
            .bind(given_up)
            .bind(attempt.error.as_deref())
            .fetch_optional(&mut *tx)
            .await
            .during(during)?;
            let Some(number) = attempts else {
                tx.rollback().await.during(during)?;
                return Ok(false);
            };
            sqlx::query(
                "INSERT INTO webhook_attempts \
                 (delivery_id, attempt, at, status_code, error, duration_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(number)
            .bind(at)
            .bind(attempt.status_code.map(i32::from))
            .bind(attempt.error.as_deref())
            .bind(i64::try_from(attempt.duration_ms).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .during(during)?;
            sqlx::query("DELETE FROM webhook_attempts WHERE delivery_id = $1 AND attempt <= $2")
                .bind(id)
                .bind(number - KEPT_ATTEMPTS as i32)
                .execute(&mut *tx)
                .await
                .during(during)?;
            tx.commit().await.during(during)?;
            Ok(true)
        })
        .await
    }

    /// The first `limit` deliveries of task `id`, oldest first, each with its kept
    /// attempts.
    pub async fn task_deliveries(
        &self,
        id: TaskId,
        limit: u32,
    ) -> Result<Vec<(Delivery, Vec<DeliveryAttempt>)>> {
        self.timed("task_deliveries", async {
            let during = || format!("reading the webhook deliveries of task {id}");
            let rows = sqlx::query(concat!(
                "SELECT ",
                delivery_columns!(),
                " FROM webhook_deliveries WHERE task_id = $1 ORDER BY created_at, id LIMIT $2"
            ))
            .bind(id.to_string())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .during(during)?;
            let mut deliveries = Vec::with_capacity(rows.len());
            for row in &rows {
                let delivery = delivery(row)?;
                let attempts = sqlx::query(
                    "SELECT attempt, at, status_code, error, duration_ms FROM webhook_attempts \
                     WHERE delivery_id = $1 ORDER BY attempt",
                )
                .bind(&delivery.id)
                .fetch_all(&self.pool)
                .await
                .during(during)?;
                let record = || format!("an attempt of webhook delivery {}", delivery.id);
                let attempts = attempts
                    .iter()
                    .map(|row| {
                        Ok(DeliveryAttempt {
                            attempt: u32::try_from(get::<i32>(row, "attempt", &record)?)
                                .unwrap_or(0),
                            at: row::timestamp(get(row, "at", &record)?, &record)?,
                            status_code: get::<Option<i32>>(row, "status_code", &record)?
                                .and_then(|code| u16::try_from(code).ok()),
                            error: get(row, "error", &record)?,
                            duration_ms: u64::try_from(get::<i64>(row, "duration_ms", &record)?)
                                .unwrap_or(0),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                deliveries.push((delivery, attempts));
            }
            Ok(deliveries)
        })
        .await
    }
}
