//! `dispatcher migrate` and the `tenant` commands (create, list, rotate-key, disable,
//! enable, budget, quota, queue-ttl, set-webhook, webhook-secret): each opens the store,
//! applies the migrations and makes one change. Owns turning the budget flags into a
//! [`Budget`], the quota flags into a [`TenantQuota`] and the webhook flags into a
//! [`WebhookSpec`], and the table `tenant list` prints. No command prints an API key
//! other than the new one it made; `webhook-secret` prints the tenant's webhook secret
//! (receivers need it to verify, and it is kept in the database to sign).

use anyhow::bail;
use secrecy::ExposeSecret as _;

use super::{LOG_TARGET, open_store};
use crate::api;
use crate::config::{BudgetArgs, DatabaseArgs, TenantCommand};
use crate::cost::Budget;
use crate::store::Tenant;
use crate::task::quota::TenantQuota;
use crate::task::submission::is_dns_label;
use crate::task::webhook::{WebhookSpec, check_events, check_url_form};
use crate::webhooks;

/// `dispatcher migrate`.
pub(super) async fn migrate(database: &DatabaseArgs) -> anyhow::Result<()> {
    open_store(database).await?;
    tracing::info!(target: LOG_TARGET, "migrations applied");
    Ok(())
}

/// `dispatcher tenant …`.
pub(super) async fn run(command: TenantCommand) -> anyhow::Result<()> {
    match command {
        TenantCommand::List { database } => {
            let store = open_store(&database).await?;
            let mut tenants = Vec::new();
            for tenant in store.tenants().await? {
                let quota = store.tenant_quota(&tenant.name).await?;
                tenants.push((tenant, quota));
            }
            print!("{}", tenant_table(&tenants));
            Ok(())
        }
        TenantCommand::RotateKey { name, database } => {
            let store = open_store(&database).await?;
            let key = api::new_api_key();
            store
                .replace_api_key(&name, &api::hash_api_key(key.expose_secret()))
                .await?;
            tracing::info!(target: LOG_TARGET, tenant = %name, "api key replaced; the old key is refused");
            println!("{}", key.expose_secret());
            Ok(())
        }
        TenantCommand::Disable { name, database } => {
            let store = open_store(&database).await?;
            let tenant = store
                .set_tenant_disabled(&name, Some(jiff::Timestamp::now()))
                .await?;
            tracing::info!(target: LOG_TARGET, tenant = %name, "tenant disabled: its key is refused and its queued tasks wait");
            println!("{}", status_line(&tenant));
            Ok(())
        }
        TenantCommand::Enable { name, database } => {
            let store = open_store(&database).await?;
            let tenant = store.set_tenant_disabled(&name, None).await?;
            tracing::info!(target: LOG_TARGET, tenant = %name, "tenant enabled");
            println!("{}", status_line(&tenant));
            Ok(())
        }
        TenantCommand::Create {
            name,
            max_queued_tasks,
            queue_ttl_seconds,
            budget,
            database,
        } => {
            if !is_dns_label(&name) {
                bail!(
                    "tenant name '{name}' must be an RFC 1123 label: 1 to 63 lowercase letters, digits or '-'"
                );
            }
            let budget = budget_of(&budget)?;
            let store = open_store(&database).await?;
            let key = api::new_api_key();
            store
                .create_tenant(
                    &name,
                    &api::hash_api_key(key.expose_secret()),
                    max_queued_tasks,
                )
                .await?;
            if budget.is_set() {
                store.set_budget(&name, &budget).await?;
            }
            if queue_ttl_seconds.is_some() {
                store
                    .set_default_queue_ttl(&name, queue_ttl_seconds)
                    .await?;
            }
            tracing::info!(target: LOG_TARGET, tenant = %name, "tenant created");
            println!("{}", key.expose_secret());
            Ok(())
        }
        TenantCommand::Budget {
            name,
            budget,
            database,
        } => {
            let budget = budget_of(&budget)?;
            let store = open_store(&database).await?;
            store.set_budget(&name, &budget).await?;
            tracing::info!(target: LOG_TARGET, tenant = %name, ?budget, "budget set");
            Ok(())
        }
        TenantCommand::Quota {
            name,
            max_running,
            max_gpus,
            clear,
            database,
        } => {
            let store = open_store(&database).await?;
            let current = store.tenant_quota(&name).await?;
            let quota = quota_of(current.clone(), max_running, &max_gpus, clear)?;
            if quota != current {
                store.set_tenant_quota(&name, &quota).await?;
                tracing::info!(target: LOG_TARGET, tenant = %name, quota = %quota, "quota set");
            }
            println!("{name}: {quota}");
            Ok(())
        }
        TenantCommand::SetWebhook {
            name,
            url,
            events,
            clear,
            database,
        } => {
            let webhook = match url {
                Some(url) if !clear => Some(webhook_of(url, events)?),
                _ => None,
            };
            let store = open_store(&database).await?;
            store.set_tenant_webhook(&name, webhook.as_ref()).await?;
            if let Some(webhook) = &webhook {
                tracing::info!(target: LOG_TARGET, tenant = %name, url = %webhook.url, "default webhook set");
                println!("{name}: {}", webhook_line(webhook));
            } else {
                tracing::info!(target: LOG_TARGET, tenant = %name, "default webhook cleared");
                println!("{name}: no default webhook");
            }
            Ok(())
        }
        TenantCommand::WebhookSecret {
            name,
            rotate,
            database,
        } => {
            let store = open_store(&database).await?;
            let secret = store
                .webhook_secret(&name, rotate, webhooks::sign::new_secret)
                .await?;
            if rotate {
                tracing::info!(target: LOG_TARGET, tenant = %name, "webhook secret replaced; the next attempts are signed with the new one");
            }
            println!("{secret}");
            Ok(())
        }
        TenantCommand::QueueTtl {
            name,
            seconds,
            database,
        } => {
            let store = open_store(&database).await?;
            store.set_default_queue_ttl(&name, seconds).await?;
            tracing::info!(target: LOG_TARGET, tenant = %name, ?seconds, "default queue TTL set");
            Ok(())
        }
    }
}

/// The default webhook `--url` and `--events` describe. Only the URL's form is checked
/// here (scheme, length, host, no user information): whether its host and addresses are
/// allowed depends on `serve`'s `--webhook-allowed-hosts`, and the deliverer checks that
/// when sending (a refusal shows on the delivery).
fn webhook_of(url: String, events: Vec<String>) -> anyhow::Result<WebhookSpec> {
    check_url_form(&url).map_err(|why| anyhow::anyhow!("--url: {why}"))?;
    let events = check_events((!events.is_empty()).then_some(events))
        .map_err(|why| anyhow::anyhow!("--events: {why}"))?;
    Ok(WebhookSpec { url, events })
}

/// `https://… (terminal, started)`.
fn webhook_line(webhook: &WebhookSpec) -> String {
    let events: Vec<&str> = webhook.events.iter().map(|e| e.as_str()).collect();
    format!("{} ({})", webhook.url, events.join(", "))
}

/// `acme: enabled` or `acme: disabled since <time>`.
fn status_line(tenant: &Tenant) -> String {
    match tenant.disabled_at {
        Some(at) => format!("{}: disabled since {at}", tenant.name),
        None => format!("{}: enabled", tenant.name),
    }
}

/// What `tenant list` prints: one row per tenant, columns aligned, no secrets.
fn tenant_table(tenants: &[(Tenant, TenantQuota)]) -> String {
    let dollars = |amount: Option<f64>| amount.map_or_else(|| "-".to_owned(), |d| format!("${d}"));
    let mut rows = vec![[
        "NAME".to_owned(),
        "CREATED".to_owned(),
        "DISABLED".to_owned(),
        "MAX QUEUED".to_owned(),
        "QUEUE TTL".to_owned(),
        "BUDGET DAY/MONTH".to_owned(),
        "QUOTA".to_owned(),
    ]];
    for (tenant, quota) in tenants {
        rows.push([
            tenant.name.clone(),
            tenant.created_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            tenant.disabled_at.map_or_else(
                || "-".to_owned(),
                |at| at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            ),
            tenant.max_queued_tasks.to_string(),
            tenant
                .default_queue_ttl_seconds
                .map_or_else(|| "-".to_owned(), |s| format!("{s}s")),
            if tenant.budget.is_set() {
                format!(
                    "{}/{} ({})",
                    dollars(tenant.budget.daily_dollars),
                    dollars(tenant.budget.monthly_dollars),
                    tenant.budget.action.as_str()
                )
            } else {
                "-".to_owned()
            },
            if quota.is_set() {
                quota.to_string()
            } else {
                "-".to_owned()
            },
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The most GPU classes one quota may list.
const MAX_GPU_CLASSES: usize = 64;

/// `current` changed as the quota flags say: `--clear` empties it, `--max-running` and
/// each `--max-gpus CLASS=N` replace their limit and keep the others. A class given twice
/// or too many classes are refused.
fn quota_of(
    current: TenantQuota,
    max_running: Option<u32>,
    max_gpus: &[(String, u32)],
    clear: bool,
) -> anyhow::Result<TenantQuota> {
    if clear {
        return Ok(TenantQuota::default());
    }
    let mut quota = current;
    if max_running.is_some() {
        quota.max_running = max_running;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (class, max) in max_gpus {
        anyhow::ensure!(
            seen.insert(class.as_str()),
            "--max-gpus {class}: the class is given twice"
        );
        quota.max_gpus.insert(class.clone(), *max);
    }
    anyhow::ensure!(
        quota.max_gpus.len() <= MAX_GPU_CLASSES,
        "--max-gpus: at most {MAX_GPU_CLASSES} GPU classes per tenant"
    );
    Ok(quota)
}

/// The budget the flags describe; a negative or non-finite amount names its flag.
fn budget_of(args: &BudgetArgs) -> anyhow::Result<Budget> {
    for (flag, amount) in [
        ("--daily-budget", args.daily_budget),
        ("--monthly-budget", args.monthly_budget),
    ] {
        if let Some(amount) = amount {
            anyhow::ensure!(
                amount.is_finite() && amount >= 0.0,
                "{flag} {amount}: a budget is a number of dollars, at least 0"
            );
        }
    }
    Ok(Budget {
        daily_dollars: args.daily_budget,
        monthly_dollars: args.monthly_budget,
        action: args.budget_action,
    })
}

#[cfg(test)]
mod tests {
    use super::{budget_of, quota_of, status_line, tenant_table};
    use crate::config::BudgetArgs;
    use crate::cost::{Budget, BudgetAction};
    use crate::store::Tenant;
    use crate::task::quota::TenantQuota;

    #[test]
    fn the_tenant_table_has_one_aligned_row_per_tenant() {
        let created: jiff::Timestamp = "2026-12-02T08:00:00Z".parse().unwrap();
        let acme = Tenant {
            name: "acme".into(),
            max_queued_tasks: 1000,
            created_at: created,
            budget: Budget::default(),
            default_queue_ttl_seconds: None,
            disabled_at: None,
        };
        let globex = Tenant {
            name: "globex".into(),
            max_queued_tasks: 5,
            budget: Budget {
                daily_dollars: Some(10.0),
                monthly_dollars: None,
                action: BudgetAction::Refuse,
            },
            default_queue_ttl_seconds: Some(600),
            disabled_at: Some("2026-12-02T09:30:00Z".parse().unwrap()),
            ..acme.clone()
        };
        let quota = TenantQuota {
            max_running: Some(2),
            max_gpus: [("a100".to_owned(), 4)].into(),
        };
        let table = tenant_table(&[
            (acme.clone(), TenantQuota::default()),
            (globex.clone(), quota),
        ]);
        assert_eq!(
            table,
            "NAME    CREATED               DISABLED              MAX QUEUED  QUEUE TTL  BUDGET DAY/MONTH  QUOTA\n\
             acme    2026-12-02T08:00:00Z  -                     1000        -          -                 -\n\
             globex  2026-12-02T08:00:00Z  2026-12-02T09:30:00Z  5           600s       $10/- (refuse)    max-running=2 max-gpus a100=4\n"
        );
        assert_eq!(status_line(&acme), "acme: enabled");
        assert_eq!(
            status_line(&globex),
            "globex: disabled since 2026-12-02T09:30:00Z"
        );
    }

    fn args(daily: Option<f64>, monthly: Option<f64>) -> BudgetArgs {
        BudgetArgs {
            daily_budget: daily,
            monthly_budget: monthly,
            budget_action: BudgetAction::Refuse,
        }
    }

    #[test]
    fn the_flags_become_the_budget() {
        assert_eq!(
            budget_of(&args(Some(5.0), None)).unwrap(),
            Budget {
                daily_dollars: Some(5.0),
                monthly_dollars: None,
                action: BudgetAction::Refuse,
            }
        );
        let none = budget_of(&args(None, None)).unwrap();
        assert!(!none.is_set());
        assert_eq!(
            budget_of(&args(Some(0.0), Some(0.0)))
                .unwrap()
                .limit(crate::cost::Period::Month),
            Some(0.0)
        );
    }

    #[test]
    fn the_quota_flags_change_only_what_they_name() {
        let current = TenantQuota {
            max_running: Some(2),
            max_gpus: [("a100".to_owned(), 4)].into(),
        };
        let h100 = [("h100".to_owned(), 2)];
        let changed = quota_of(current.clone(), None, &h100, false).unwrap();
        assert_eq!(changed.max_running, Some(2));
        assert_eq!(
            changed.to_string(),
            "max-running=2 max-gpus a100=4 max-gpus h100=2"
        );
        let changed = quota_of(current.clone(), Some(5), &[], false).unwrap();
        assert_eq!(changed.to_string(), "max-running=5 max-gpus a100=4");
        assert_eq!(
            quota_of(current.clone(), None, &[], false).unwrap(),
            current
        );
        assert_eq!(
            quota_of(current.clone(), None, &[], true).unwrap(),
            TenantQuota::default()
        );
        let twice = [("h100".to_owned(), 2), ("h100".to_owned(), 3)];
        assert_eq!(
            quota_of(current.clone(), None, &twice, false)
                .unwrap_err()
                .to_string(),
            "--max-gpus h100: the class is given twice"
        );
        let many: Vec<(String, u32)> = (0..70).map(|i| (format!("c{i}"), 1)).collect();
        assert!(
            quota_of(current, None, &many, false)
                .unwrap_err()
                .to_string()
                .contains("at most 64")
        );
    }

    #[test]
    fn a_negative_or_non_finite_amount_names_its_flag() {
        for (budget, flag) in [
            (args(Some(-5.0), None), "--daily-budget -5"),
            (args(None, Some(f64::NAN)), "--monthly-budget NaN"),
            (args(Some(1.0), Some(f64::INFINITY)), "--monthly-budget inf"),
        ] {
            let error = budget_of(&budget).unwrap_err().to_string();
            assert!(error.starts_with(flag), "{error}");
        }
    }
}
