//! The two listeners of the embedded default, black-box through the `dispatcher` binary:
//! `/metrics` (every tenant's names and spend) is only on the metrics listener, the api's
//! listener answers 404 for it; `/readyz` answers from a cached check however often it is
//! asked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use crate::common::{scrape, start_local_dispatcher};

/// `agent_bus_readiness_checks_total` summed over its results.
async fn readiness_checks(http: &reqwest::Client, metrics: &str) -> f64 {
    let text = scrape(http, metrics).await;
    text.lines()
        .filter(|line| line.starts_with("agent_bus_readiness_checks_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn metrics_are_only_on_the_metrics_listener() {
    let dispatcher = start_local_dispatcher("sqlite://agent-bus.db").await;
    let http = &dispatcher.http;

    let on_api = http
        .get(format!("{}/metrics", dispatcher.base))
        .send()
        .await
        .unwrap();
    assert_eq!(on_api.status().as_u16(), 404);

    let on_metrics = http
        .get(format!("{}/metrics", dispatcher.metrics))
        .send()
        .await
        .unwrap();
    assert_eq!(on_metrics.status().as_u16(), 200);
    let text = on_metrics.text().await.unwrap();
    assert!(text.contains("agent_bus_build_info"), "{text}");

    // The probes answer on both (kubelet probes and `dispatcher healthcheck` use the api's
    // port; a scraper may check the metrics port).
    for base in [&dispatcher.base, &dispatcher.metrics] {
        for probe in ["/healthz", "/readyz"] {
            let answer = http.get(format!("{base}{probe}")).send().await.unwrap();
            assert_eq!(answer.status().as_u16(), 200, "{base}{probe}");
        }
    }
    // The REST API is not on the metrics listener.
    let tasks = http
        .get(format!("{}/v1/tasks", dispatcher.metrics))
        .bearer_auth(&dispatcher.key)
        .send()
        .await
        .unwrap();
    assert_eq!(tasks.status().as_u16(), 404);
}

#[tokio::test]
async fn fifty_concurrent_readyz_make_at_most_two_dependency_checks() {
    let dispatcher = start_local_dispatcher("sqlite://agent-bus.db").await;
    let http = &dispatcher.http;
    let before = readiness_checks(http, &dispatcher.metrics).await;
    // Past the age of the answer the start-up wait was given, so the burst needs a check.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let answers = futures::future::join_all((0..50).map(|_| async {
        http.get(format!("{}/readyz", dispatcher.base))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }))
    .await;
    assert!(answers.iter().all(|status| *status == 200), "{answers:?}");

    let checks = readiness_checks(http, &dispatcher.metrics).await - before;
    // One check, or two when the burst straddles the end of the cached answer's second.
    assert!(
        (1.0..=2.0).contains(&checks),
        "50 concurrent /readyz made {checks} dependency checks"
    );
}
