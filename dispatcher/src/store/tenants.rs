//! Tenants: who may submit, with a hashed API key and a limit on waiting tasks; an
//! operator lists them, replaces a key and disables or enables a tenant.
//!
//! Invariants: a key is looked up by its hash on every request (there is no cache), so a
//! replaced key or a disabled tenant takes effect on the next request.

use super::{During as _, Result, Store, StoreError, is_unique_violation, now_millis, row};
use crate::store::Budget;
use crate::store::row::tenant_columns;

/// A tenant: who may submit, and how many of its tasks may wait at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub max_queued_tasks: u32,
    pub created_at: jiff::Timestamp,
    pub budget: Budget,
    /// The queue TTL of its tasks that ask for none; `None`: they wait as long as it takes.
    pub default_queue_ttl_seconds: Option<u32>,
    /// When an operator disabled it: its key is refused and its queued tasks wait.
    pub disabled_at: Option<jiff::Timestamp>,
}

impl Store {
    /// Registers a tenant. [`StoreError::TenantExists`] if the name is taken,
    /// [`StoreError::ApiKeyInUse`] if another tenant has the same api key hash.
    pub async fn create_tenant(
        &self,
        name: &str,
        api_key_hash: &str,
        max_queued_tasks: u32,
    ) -> Result<Tenant> {
        let during = || format!("creating tenant '{name}'");
        let created_at = now_millis();
        let inserted = sqlx::query(
            "INSERT INTO tenants (name, api_key_hash, max_queued_tasks, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(name)
        .bind(api_key_hash)
        .bind(i64::from(max_queued_tasks))
        .bind(created_at)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(Tenant {
                name: name.to_owned(),
                max_queued_tasks,
                created_at: row::timestamp(created_at, &during)?,
                budget: Budget::default(),
                default_queue_ttl_seconds: None,
                disabled_at: None,
            }),
            Err(error) if is_unique_violation(&error) => {
                let name_taken: Option<i64> =
                    sqlx::query_scalar("SELECT 1 FROM tenants WHERE name = $1")
                        .bind(name)
                        .fetch_optional(&self.pool)
                        .await
                        .during(during)?;
                let tenant = name.to_owned();
                Err(if name_taken.is_some() {
                    StoreError::TenantExists { tenant }
                } else {
                    StoreError::ApiKeyInUse { tenant }
                })
            }
            Err(error) => Err(StoreError::sqlx(during(), error)),
        }
    }

    /// The tenant whose api key hashes to `api_key_hash` (authentication).
    pub async fn tenant_by_key_hash(&self, api_key_hash: &str) -> Result<Option<Tenant>> {
        self.timed("tenant_by_key_hash", async {
            let row = sqlx::query(concat!(
                "SELECT ",
                tenant_columns!(),
                " FROM tenants WHERE api_key_hash = $1"
            ))
            .bind(api_key_hash)
            .fetch_optional(&self.pool)
            .await
            .during(|| "looking up a tenant by api key".to_owned())?;
            row.as_ref().map(row::tenant).transpose()
        })
        .await
    }

    /// The tenant named `name`, if there is one.
    pub async fn tenant(&self, name: &str) -> Result<Option<Tenant>> {
        self.timed("tenant", async {
            let row = sqlx::query(concat!(
                "SELECT ",
                tenant_columns!(),
                " FROM tenants WHERE name = $1"
            ))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .during(|| format!("reading tenant {name}"))?;
            row.as_ref().map(row::tenant).transpose()
        })
        .await
    }

    /// Sets (or, with `None`, clears) the queue TTL of `name`'s tasks that ask for none.
    /// [`StoreError::UnknownTenant`] if there is no such tenant.
    pub async fn set_default_queue_ttl(&self, name: &str, seconds: Option<u32>) -> Result<()> {
        self.timed("set_default_queue_ttl", async {
            let updated =
                sqlx::query("UPDATE tenants SET default_queue_ttl_seconds = $2 WHERE name = $1")
                    .bind(name)
                    .bind(seconds.map(i64::from))
                    .execute(&self.pool)
                    .await
                    .during(|| format!("setting the queue TTL of tenant '{name}'"))?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::UnknownTenant {
                    tenant: name.to_owned(),
                });
            }
            Ok(())
        })
        .await
    }

    /// Every tenant, by name.
    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        self.timed("tenants", async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                tenant_columns!(),
                " FROM tenants ORDER BY name"
            ))
            .fetch_all(&self.pool)
            .await
            .during(|| "listing tenants".to_owned())?;
            rows.iter().map(row::tenant).collect()
        })
        .await
    }

    /// Replaces the API key of `name` by the one hashing to `api_key_hash`: the old key is
    /// refused from the next request on. [`StoreError::UnknownTenant`] if there is no
    /// such tenant, [`StoreError::ApiKeyInUse`] if another tenant has that hash.
    pub async fn replace_api_key(&self, name: &str, api_key_hash: &str) -> Result<()> {
        self.timed("replace_api_key", async {
            let updated = sqlx::query("UPDATE tenants SET api_key_hash = $2 WHERE name = $1")
                .bind(name)
                .bind(api_key_hash)
                .execute(&self.pool)
                .await;
            match updated {
                Ok(done) if done.rows_affected() == 0 => Err(StoreError::UnknownTenant {
                    tenant: name.to_owned(),
                }),
                Ok(_) => Ok(()),
                Err(error) if is_unique_violation(&error) => Err(StoreError::ApiKeyInUse {
                    tenant: name.to_owned(),
                }),
                Err(error) => Err(StoreError::sqlx(
                    format!("replacing the api key of tenant '{name}'"),
                    error,
                )),
            }
        })
        .await
    }

    /// Disables `name` as of `at` (its key is refused, its queued tasks are not launched),
    /// or with `None` enables it again. Disabling a disabled tenant keeps the first time.
    /// [`StoreError::UnknownTenant`] if there is no such tenant.
    pub async fn set_tenant_disabled(
        &self,
        name: &str,
        at: Option<jiff::Timestamp>,
    ) -> Result<Tenant> {
        self.timed("set_tenant_disabled", async {
            let updated = match at {
                Some(at) => sqlx::query(
                    "UPDATE tenants SET disabled_at = COALESCE(disabled_at, $2) WHERE name = $1",
                )
                .bind(name)
                .bind(row::millis(at)),
                None => {
                    sqlx::query("UPDATE tenants SET disabled_at = NULL WHERE name = $1").bind(name)
                }
            }
            .execute(&self.pool)
            .await
            .during(|| format!("disabling or enabling tenant '{name}'"))?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::UnknownTenant {
                    tenant: name.to_owned(),
                });
            }
            self.tenant(name)
                .await?
                .ok_or_else(|| StoreError::UnknownTenant {
                    tenant: name.to_owned(),
                })
        })
        .await
    }
}
