//! Tenant budgets that alert or refuse (402), and the `dispatcher tenant` budget flags.

use crate::common::{Db, api_on, on_both_stores, sqlite_db, task_body};
use axum::http::{Method, StatusCode};
use dispatcher::store::{Budget, BudgetAction};
use serde_json::{Value, json};

use super::support::*;

on_both_stores!(spent_budgets_refuse_or_alert,);

async fn spent_budgets_refuse_or_alert(db: Db) {
    let api = api_on(db.store.clone(), |_| {}).await;
    let acme = api.tenant("acme", 100).await;
    let globex = api.tenant("globex", 100).await;
    db.store
        .set_budget(
            "acme",
            &Budget {
                daily_dollars: Some(1.0),
                monthly_dollars: Some(100.0),
                action: BudgetAction::Refuse,
            },
        )
        .await
        .unwrap();
    // Under budget: accepted. The task's runner then reports $1.50 of LLM calls.
    let keyed = task_body("spender").to_string();
    let headers = [("idempotency-key", "spender-1")];
    let (status, _, spender) = api
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&acme),
            Some(&keyed),
            &headers,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{spender}");
    let spender = id_of(&spender);
    walk(&api, &spender, &LAUNCH).await;
    let (status, _) = report(
        &api,
        &spender,
        &json!([usage(1, "gpt-4o", 10, (1, 1), 1.5)]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let tomorrow = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .tomorrow()
        .unwrap()
        .start_of_day()
        .unwrap()
        .timestamp();
    for attempt in 1..=2 {
        let (status, body) = api.submit(&acme, &task_body("more")).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{attempt}: {body}");
        assert_eq!(body["error"]["code"], "budget_exceeded");
        let message = body["error"]["message"].as_str().unwrap();
        for part in [
            "acme",
            "daily budget",
            "$1.50",
            "$1.00",
            &format!("accepted again from {tomorrow}"),
        ] {
            assert!(message.contains(part), "{part:?} not in {message:?}");
        }
    }
    let (_, list) = api.get(&acme, "/v1/tasks").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "nothing refused was stored"
    );
    // A retry of the submission accepted before the budget was spent is still a replay:
    // the task exists, and the client must learn so rather than read a refusal.
    let (status, replay_headers, replayed) = api
        .call(
            Method::POST,
            "/v1/tasks",
            Some(&acme),
            Some(&keyed),
            &headers,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["id"], spender);
    assert_eq!(replay_headers.get("idempotent-replayed").unwrap(), "true");
    // A dry run creates nothing, so it is not refused.
    let (status, _, dry) = api
        .call(
            Method::POST,
            "/v1/tasks?dry_run=true",
            Some(&acme),
            Some(&task_body("preview").to_string()),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    // Another tenant's budget is not acme's.
    submit_ok(&api, &globex, &task_body("unaffected")).await;

    let text = scrape(&api).await;
    assert_eq!(
        value(
            &text,
            "agent_bus_budget_refusals_total",
            &[("tenant", "acme"), ("period", "day")]
        ),
        2.0
    );
    for (period, budget) in [("day", 1.0), ("month", 100.0)] {
        let labels = [("tenant", "acme"), ("period", period)];
        assert_close(
            value(&text, "agent_bus_tenant_spend_dollars", &labels),
            1.5,
            1e-9,
            &format!("spend this {period}"),
        );
        assert_eq!(
            value(&text, "agent_bus_tenant_budget_dollars", &labels),
            budget
        );
    }
    assert!(
        matching(
            &text,
            "agent_bus_tenant_spend_dollars",
            &[("tenant", "globex")]
        )
        .is_empty(),
        "tenants without a budget have no budget gauges"
    );
    let usage = usage_of(&api, &acme, "").await;
    assert_eq!(
        usage["budget"],
        json!({"daily_dollars": 1.0, "monthly_dollars": 100.0, "action": "refuse",
               "spent_today_dollars": 1.5, "spent_this_month_dollars": 1.5})
    );
    assert_close(
        f(&usage["unfinished_dollars"]),
        1.5,
        1e-9,
        "the spender is still running",
    );

    // The monthly budget refuses too, and names itself.
    db.store
        .set_budget(
            "acme",
            &Budget {
                daily_dollars: None,
                monthly_dollars: Some(1.25),
                action: BudgetAction::Refuse,
            },
        )
        .await
        .unwrap();
    let (status, body) = api.submit(&acme, &task_body("more")).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("monthly budget of $1.25"), "{message}");

    // With action alert, a spent budget only shows.
    db.store
        .set_budget(
            "acme",
            &Budget {
                daily_dollars: Some(1.0),
                monthly_dollars: None,
                action: BudgetAction::Alert,
            },
        )
        .await
        .unwrap();
    submit_ok(&api, &acme, &task_body("alerted")).await;
    let text = scrape(&api).await;
    assert_eq!(
        value(
            &text,
            "agent_bus_budget_refusals_total",
            &[("tenant", "acme"), ("period", "day")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "agent_bus_budget_refusals_total",
            &[("tenant", "acme"), ("period", "month")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "agent_bus_tenant_budget_dollars",
            &[("tenant", "acme"), ("period", "day")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "agent_bus_tenant_budget_dollars",
            &[("tenant", "acme"), ("period", "month")]
        ),
        None,
        "no monthly budget, no gauge"
    );
    assert_close(
        value(
            &text,
            "agent_bus_tenant_spend_dollars",
            &[("tenant", "acme"), ("period", "month")],
        ),
        1.5,
        1e-9,
        "spend shows without a budget for the period",
    );

    // A zero budget with action refuse accepts nothing; clearing it accepts again.
    db.store
        .set_budget(
            "globex",
            &Budget {
                daily_dollars: Some(0.0),
                monthly_dollars: None,
                action: BudgetAction::Refuse,
            },
        )
        .await
        .unwrap();
    let (status, body) = api.submit(&globex, &task_body("zero")).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    db.store
        .set_budget("globex", &Budget::default())
        .await
        .unwrap();
    submit_ok(&api, &globex, &task_body("free")).await;
    let usage = usage_of(&api, &globex, "").await;
    assert_eq!(usage["budget"]["daily_dollars"], Value::Null);
    assert_eq!(usage["budget"]["action"], "alert");
    let text = scrape(&api).await;
    assert!(
        matching(
            &text,
            "agent_bus_tenant_budget_dollars",
            &[("tenant", "globex")]
        )
        .is_empty()
    );
}

/// `dispatcher ARGS` against the SQLite file at `url`.
async fn dispatcher(url: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(args)
        .env("AGENT_BUS_LOG", "warn")
        .env("DATABASE_URL", url)
        .env_remove("REDIS_URL")
        .env_remove("KUBECONFIG")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn tenant_commands_set_budgets_and_name_bad_flags() {
    let db = sqlite_db().await;
    let url = db.url.clone();
    let ok = |output: &std::process::Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let output = dispatcher(
        &url,
        &[
            "tenant",
            "create",
            "acme",
            "--daily-budget",
            "5",
            "--budget-action",
            "refuse",
        ],
    )
    .await;
    ok(&output);
    let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("ab_"), "{key}");
    let daily_refuse = Budget {
        daily_dollars: Some(5.0),
        monthly_dollars: None,
        action: BudgetAction::Refuse,
    };
    assert_eq!(
        db.store.budgets().await.unwrap(),
        vec![("acme".to_owned(), daily_refuse)]
    );
    // The key works and the API shows the budget.
    let api = api_on(db.store.clone(), |_| {}).await;
    let usage = usage_of(&api, &key, "").await;
    assert_eq!(usage["budget"]["daily_dollars"], 5.0);
    assert_eq!(usage["budget"]["action"], "refuse");

    // `tenant budget` sets the budgets the flags give: those not given are cleared and
    // the action is `alert` unless said otherwise.
    ok(&dispatcher(
        &url,
        &["tenant", "budget", "acme", "--monthly-budget", "100"],
    )
    .await);
    assert_eq!(
        db.store.budgets().await.unwrap(),
        vec![(
            "acme".to_owned(),
            Budget {
                daily_dollars: None,
                monthly_dollars: Some(100.0),
                action: BudgetAction::Alert,
            }
        )]
    );
    let usage = usage_of(&api, &key, "").await;
    assert_eq!(usage["budget"]["monthly_dollars"], 100.0);

    for (args, flag) in [
        (
            vec!["tenant", "create", "beta", "--daily-budget=-5"],
            "--daily-budget",
        ),
        (
            vec!["tenant", "create", "beta", "--daily-budget", "-5"],
            "--daily-budget",
        ),
        (
            vec!["tenant", "create", "beta", "--monthly-budget", "NaN"],
            "--monthly-budget",
        ),
        (
            vec!["tenant", "create", "beta", "--budget-action", "maybe"],
            "--budget-action",
        ),
        (
            vec!["tenant", "budget", "acme", "--monthly-budget=-1"],
            "--monthly-budget",
        ),
        (
            vec!["tenant", "budget", "acme", "--budget-action", "maybe"],
            "--budget-action",
        ),
    ] {
        let output = dispatcher(&url, &args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?} printed a key");
    }
    let output = dispatcher(&url, &["tenant", "budget", "ghost", "--daily-budget", "1"]).await;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("ghost"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Nothing refused was written: beta does not exist, acme's budget is unchanged.
    assert_eq!(
        db.store.budgets().await.unwrap()[0].1.monthly_dollars,
        Some(100.0)
    );
    ok(&dispatcher(&url, &["tenant", "create", "beta"]).await);
    assert_eq!(
        db.store.budgets().await.unwrap().len(),
        1,
        "beta has no budget"
    );
}
