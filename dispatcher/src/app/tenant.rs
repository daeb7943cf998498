//! `dispatcher migrate` and the `tenant` commands (create, budget, queue-ttl): each opens the store, applies the
//! migrations and makes one change. Owns turning the budget flags into a [`Budget`].

use anyhow::bail;

use super::LOG_TARGET;
use crate::api;
use crate::config::{BudgetArgs, DatabaseArgs, TenantCommand};
use crate::cost::Budget;
use crate::store::Store;
use crate::task::submission::is_dns_label;

/// `dispatcher migrate`.
pub(super) async fn migrate(database: &DatabaseArgs) -> anyhow::Result<()> {
    let store = Store::connect(&database.database_url, database.database_max_connections).await?;
    store.migrate().await?;
    tracing::info!(target: LOG_TARGET, "migrations applied");
    Ok(())
}

/// `dispatcher tenant create|budget`.
pub(super) async fn run(command: TenantCommand) -> anyhow::Result<()> {
    match command {
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
            let store =
                Store::connect(&database.database_url, database.database_max_connections).await?;
            store.migrate().await?;
            let key = api::new_api_key();
            store
                .create_tenant(&name, &api::hash_api_key(&key), max_queued_tasks)
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
            println!("{key}");
            Ok(())
        }
        TenantCommand::Budget {
            name,
            budget,
            database,
        } => {
            let budget = budget_of(&budget)?;
            let store =
                Store::connect(&database.database_url, database.database_max_connections).await?;
            store.migrate().await?;
            store.set_budget(&name, &budget).await?;
            tracing::info!(target: LOG_TARGET, tenant = %name, ?budget, "budget set");
            Ok(())
        }
        TenantCommand::QueueTtl {
            name,
            seconds,
            database,
        } => {
            let store =
                Store::connect(&database.database_url, database.database_max_connections).await?;
            store.migrate().await?;
            store.set_default_queue_ttl(&name, seconds).await?;
            tracing::info!(target: LOG_TARGET, tenant = %name, ?seconds, "default queue TTL set");
            Ok(())
        }
    }
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
    use super::budget_of;
    use crate::config::BudgetArgs;
    use crate::cost::{Budget, BudgetAction};

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
