//! The local executor's task users: each tenant's slot, from which its tasks' user id
//! is made, and the tenant count a dispatcher without root checks.
//!
//! Invariants: a slot is given to one tenant name once and never again, so no two
//! tenants' tasks ever share a user id, even after a tenant is gone.

use super::{During as _, Result, Store, StoreError, is_unique_violation};

/// How often a slot is asked for again after another process took the same one.
const SLOT_TRIES: usize = 5;

impl Store {
    /// The slot of `tenant`: the one it has, else the next free one (the highest given
    /// plus one), kept from now on.
    pub async fn local_task_slot(&self, tenant: &str) -> Result<u32> {
        self.timed("local_task_slot", async {
            let during = || format!("reading the task user slot of tenant '{tenant}'");
            for _ in 0..SLOT_TRIES {
                let found: Option<i64> =
                    sqlx::query_scalar("SELECT slot FROM local_task_users WHERE tenant = $1")
                        .bind(tenant)
                        .fetch_optional(&self.pool)
                        .await
                        .during(during)?;
                if let Some(slot) = found {
                    return u32::try_from(slot)
                        .map_err(|e| StoreError::corrupt(during(), e.to_string()));
                }
                // `WHERE true`: SQLite needs it to read ON CONFLICT after a SELECT.
                let given = sqlx::query(
                    "INSERT INTO local_task_users (tenant, slot) \
                     SELECT $1, COALESCE(MAX(slot) + 1, 0) FROM local_task_users WHERE true \
                     ON CONFLICT (tenant) DO NOTHING",
                )
                .bind(tenant)
                .execute(&self.pool)
                .await;
                match given {
                    Ok(_) => {}
                    // Another process gave the same slot to another tenant: ask again.
                    Err(error) if is_unique_violation(&error) => {}
                    Err(error) => return Err(error).during(during),
                }
            }
            Err(StoreError::corrupt(
                during(),
                "no slot could be given (too many at once)".to_owned(),
            ))
        })
        .await
    }

    /// How many tenants there are.
    pub async fn tenant_count(&self) -> Result<u64> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tenants")
            .fetch_one(&self.pool)
            .await
            .during(|| "counting tenants".to_owned())?;
        Ok(u64::try_from(count).unwrap_or_default())
    }
}
