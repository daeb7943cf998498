//! LLM usage reported by runners: counted once however often it is resent, into the
//! metrics and the task's cost.

use crate::common::{Db, api_on, on_both_stores, task_body};
use axum::http::StatusCode;
use dispatcher::task::{TaskId, TaskState};
use serde_json::json;

use super::support::*;

on_both_stores!(llm_usage_is_counted_once_into_metrics_and_the_task_cost,);

async fn llm_usage_is_counted_once_into_metrics_and_the_task_cost(db: Db) {
    let api = api_on(db.store.clone(), |_| {}).await;
    let acme = api.tenant("acme", 10).await;
    let id = id_of(&submit_ok(&api, &acme, &task_body("agent")).await);
    walk(&api, &id, &LAUNCH).await;
    let batch = json!([
        {"sequence": 1, "sent_at": "2026-11-30T00:00:00Z", "kind": "started", "hostname": "h"},
        usage(2, "gpt-4o", 3, (1200, 300), 0.5),
        usage(3, "claude-sonnet-4", 1, (100, 50), 0.25),
    ]);
    let (status, receipt) = report(&api, &id, &batch).await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(receipt, json!({"accepted": 3, "duplicates": 0}));
    // The runner resends after a lost response.
    let (status, receipt) = report(&api, &id, &batch).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(receipt, json!({"accepted": 0, "duplicates": 3}));

    let view = read(&api, &acme, &id).await;
    assert_eq!(view["state"], "running", "started moves the task: {view}");
    assert_close(f(&view["cost"]["llm_dollars"]), 0.75, 1e-9, "LLM dollars");
    assert_close(
        f(&view["cost"]["total_dollars"]),
        0.75,
        1e-9,
        "a task without requests costs its LLM use only",
    );
    assert_eq!(view["cost"]["settled"], false);

    let text = scrape(&api).await;
    let tokens = |text: &str, model: &str, direction: &str| {
        value(
            text,
            "agent_bus_llm_tokens_total",
            &[
                ("tenant", "acme"),
                ("model", model),
                ("direction", direction),
            ],
        )
    };
    let calls = |text: &str, model: &str| {
        value(
            text,
            "agent_bus_llm_calls_total",
            &[("tenant", "acme"), ("model", model)],
        )
    };
    let llm_dollars = |text: &str| {
        value(
            text,
            "agent_bus_cost_dollars_total",
            &[
                ("tenant", "acme"),
                ("queue", "default"),
                ("resource", "llm"),
            ],
        )
    };
    assert_eq!(calls(&text, "gpt-4o"), 3.0);
    assert_eq!(calls(&text, "claude-sonnet-4"), 1.0);
    assert_eq!(tokens(&text, "gpt-4o", "input"), 1200.0);
    assert_eq!(tokens(&text, "gpt-4o", "output"), 300.0);
    assert_eq!(tokens(&text, "claude-sonnet-4", "input"), 100.0);
    assert_close(llm_dollars(&text), 0.75, 1e-9, "LLM dollars counted once");
    for (kind, count) in [("usage", 2.0), ("started", 1.0)] {
        assert_eq!(
            value(&text, "agent_bus_runner_reports_total", &[("kind", kind)]),
            count,
            "{kind}"
        );
    }

    // A later batch with one new report and one old one adds the new one only.
    let (status, receipt) = report(
        &api,
        &id,
        &json!([
            usage(3, "claude-sonnet-4", 1, (100, 50), 0.25),
            usage(4, "gpt-4o", 1, (10, 5), 0.1)
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(receipt, json!({"accepted": 1, "duplicates": 1}));
    // Reports that break a rule are refused whole and count nothing.
    for (bad, field) in [
        (usage(5, "gpt-4o", 1, (1, 1), -1.0), "reports[0].cost_usd"),
        (usage(5, "", 1, (1, 1), 1.0), "reports[0].model"),
    ] {
        let (status, body) = report(&api, &id, &json!([bad])).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["field"], field);
    }
    let text = scrape(&api).await;
    assert_eq!(calls(&text, "gpt-4o"), 4.0);
    assert_eq!(tokens(&text, "gpt-4o", "input"), 1210.0);
    assert_close(llm_dollars(&text), 0.85, 1e-9, "LLM dollars");

    finish(&api, &id, TaskState::Succeeded).await;
    let done = read(&api, &acme, &id).await;
    assert_eq!(done["cost"]["settled"], true);
    assert_close(f(&done["cost"]["llm_dollars"]), 0.85, 1e-9, "settled LLM");
    assert_close(
        f(&done["cost"]["total_dollars"]),
        0.85,
        1e-9,
        "settled total",
    );
    assert_close(
        f(&done["runner"]["usage_cost_usd"]),
        0.85,
        1e-9,
        "the runner view agrees",
    );
    let text = scrape(&api).await;
    assert_close(
        llm_dollars(&text),
        0.85,
        1e-9,
        "finishing adds no LLM cost again",
    );
    for resource in ["gpu", "cpu", "memory"] {
        assert_eq!(
            metric(
                &text,
                "agent_bus_cost_dollars_total",
                &[("resource", resource)]
            ),
            None,
            "nothing requested, nothing charged: {resource}"
        );
    }

    // The pod's termination summary counts more than arrived (the runner gave up on its
    // last reports): only the difference is added, once.
    let summary = protocol::TerminationSummary {
        v: 1,
        usage: vec![
            summary_usage("gpt-4o", 6, (2000, 400), 1.10),
            summary_usage("claude-sonnet-4", 1, (100, 50), 0.25),
            summary_usage("mistral-large", 1, (10, 10), 0.05),
        ],
        undelivered_reports: 2,
        ..protocol::TerminationSummary::default()
    };
    let task_id: TaskId = id.parse().unwrap();
    for _ in 0..2 {
        api.lifecycle()
            .record_termination(task_id, 1, &summary)
            .await
            .unwrap();
    }
    let done = read(&api, &acme, &id).await;
    assert_close(
        f(&done["cost"]["llm_dollars"]),
        1.40,
        1e-9,
        "0.85 reported + 0.50 (gpt-4o) + 0.05 (mistral) unreported",
    );
    let text = scrape(&api).await;
    assert_close(
        llm_dollars(&text),
        1.40,
        1e-9,
        "the unreported LLM dollars, once",
    );
    assert_eq!(calls(&text, "gpt-4o"), 6.0);
    assert_eq!(tokens(&text, "gpt-4o", "input"), 2000.0);
    assert_eq!(calls(&text, "mistral-large"), 1.0);
    assert_eq!(
        calls(&text, "claude-sonnet-4"),
        1.0,
        "fully reported: unchanged"
    );
}

fn summary_usage(
    model: &str,
    calls: u64,
    (input, output): (u64, u64),
    cost: f64,
) -> protocol::Usage {
    protocol::Usage {
        model: model.to_owned(),
        calls,
        input_tokens: input,
        output_tokens: output,
        cost_usd: cost,
    }
}
