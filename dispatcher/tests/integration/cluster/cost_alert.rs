//! The end-to-end path of a cost alert through a real Prometheus and Alertmanager.

use super::*;

/// The repository's file `path`.
fn repo_file(path: &str) -> String {
    std::fs::read_to_string(testsupport::repo_root().join(path)).unwrap()
}

/// Every webhook notification Alertmanager sent to the test: (path, body).
type Notifications = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// An HTTP server that keeps every POST, standing in for the pager, chat and finance
/// endpoints of the shipped Alertmanager configuration.
async fn webhook_receiver() -> (String, Notifications) {
    let received: Notifications = Notifications::default();
    let keep = received.clone();
    let app = axum::Router::new().fallback(axum::routing::post(
        move |uri: axum::http::Uri, body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                keep.lock().unwrap().push((uri.path().to_owned(), body));
                "ok"
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}"), received)
}

/// Replaces every `key: value` line's value (the shipped files' timings) with `value`.
fn with_setting(yaml: &str, key: &str, value: &str) -> String {
    yaml.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with(&format!("{key}:")) {
                let indent = &line[..line.len() - trimmed.len()];
                format!("{indent}{key}: {value}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let response = http.get(url).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// The end-to-end path of a cost alert: a real Prometheus scrapes the dispatcher and
/// evaluates the shipped rules (their `for:` shortened to 1 s), a real Alertmanager with
/// the shipped routing (webhook URLs pointed at this test) delivers. One 2×V100 task
/// ($5.02/h) stays under the $8/h threshold; a second one pushes the running cost rate
/// over it, and AgentBusHighCostRate reaches the finance and chat receivers, not the pager.
/// (V100s: the fallback test needs a whole A100 node free.)
#[tokio::test]
async fn expensive_gpu_tasks_raise_the_cost_alert_in_alertmanager() {
    testsupport::needs_env!(
        Cluster,
        Postgres,
        Redis,
        Program("prometheus"),
        Program("alertmanager")
    );
    with_environment("e2e-cost-alert", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup
            .start_with(
                "cost-alert",
                &["--cost-rate-alert-dollars-per-hour", "8", "--metrics-snapshot-max-age", "0"],
            )
            .await;
        let http = reqwest::Client::new();
        let work = std::env::temp_dir().join(format!("agent-bus-alerting-{}", testsupport::unique_suffix()));
        std::fs::create_dir_all(&work).unwrap();

        let (webhooks, notifications) = webhook_receiver().await;
        let mut alertmanager_config = repo_file("deploy/alertmanager/alertmanager.yml");
        for host in ["http://pager.example.invalid", "http://chat.example.invalid", "http://finance.example.invalid"] {
            alertmanager_config = alertmanager_config.replace(host, &webhooks);
        }
        let alertmanager_config = with_setting(&with_setting(&alertmanager_config, "group_wait", "1s"), "group_interval", "1s");
        std::fs::write(work.join("alertmanager.yml"), alertmanager_config).unwrap();
        let alertmanager_port = testsupport::free_port();
        let _alertmanager = tokio::process::Command::new(testsupport::program_on_path("alertmanager"))
            .arg(format!("--config.file={}", work.join("alertmanager.yml").display()))
            .arg(format!("--storage.path={}", work.join("alertmanager-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{alertmanager_port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap();

        let rules = with_setting(&repo_file("deploy/prometheus/agent-bus.rules.yml"), "for", "1s");
        std::fs::write(work.join("agent-bus.rules.yml"), rules).unwrap();
        let target = dispatcher.metrics.trim_start_matches("http://");
        let prometheus_config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{rules}]\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{alertmanager_port}']\n\
             scrape_configs:\n  - job_name: agent-bus\n    static_configs:\n      - targets: ['{target}']\n",
            rules = work.join("agent-bus.rules.yml").display()
        );
        std::fs::write(work.join("prometheus.yml"), prometheus_config).unwrap();
        let prometheus_port = testsupport::free_port();
        let _prometheus = tokio::process::Command::new(testsupport::program_on_path("prometheus"))
            .arg(format!("--config.file={}", work.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", work.join("prometheus-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .arg("--log.level=warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let prometheus = format!("http://127.0.0.1:{prometheus_port}");
        let query = |expr: &str| format!("{prometheus}/api/v1/query?query={}", urlencode(expr));
        let cost_rate = || async {
            let body = get_json(&http, &query("sum(agent_bus_cost_rate_dollars_per_hour)")).await?;
            body["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| body.to_string())
        };
        let firing = || async {
            let body = get_json(&http, &format!("{prometheus}/api/v1/alerts")).await?;
            Ok::<Vec<Value>, String>(
                body["data"]["alerts"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|a| a["labels"]["alertname"] == "AgentBusHighCostRate")
                    .collect(),
            )
        };

        poll_until("prometheus to scrape the dispatcher", CLUSTER_TIMEOUT, || async {
            let body = get_json(&http, &query("up{job=\"agent-bus\"}")).await?;
            if body["data"]["result"][0]["value"][1] == "1" { Ok(()) } else { Err(body.to_string()) }
        })
        .await;

        let expensive = json!({"name": "train", "image": "registry.invalid/train:1", "command": ["python", "train.py"],
            "resources": {"cpu": "1", "memory": "4Gi", "gpu": {"count": 2, "class": "v100"}},
            "timeout_seconds": 3600, "annotations": {"agent-bus.io/test-run-seconds": "600"}});
        let (status, first) = dispatcher.post(&key, "/v1/tasks", &expensive, None).await;
        assert_eq!(status, 201, "{first}");
        // 2 × $2.48 + 1 core × $0.04 + 4 GiB × $0.005 per hour, up to its 1 h timeout.
        assert_eq!(first["cost_estimate"]["per_hour_dollars"], 5.02, "{first}");
        let first_id = first["id"].as_str().unwrap().to_owned();
        dispatcher.wait_for_state(&key, &first_id, &["running"]).await;

        // One task: the rate is scraped, a rule evaluation sees it, and nothing fires.
        let one = poll_until("prometheus to see one task's cost rate", CLUSTER_TIMEOUT, || async {
            let rate = cost_rate().await?;
            if (rate - 5.02).abs() < 0.01 { Ok(rate) } else { Err(format!("{rate}")) }
        })
        .await;
        let evaluated_after = std::time::SystemTime::now();
        poll_until("a rule evaluation after that", CLUSTER_TIMEOUT, || async {
            let body = get_json(&http, &format!("{prometheus}/api/v1/rules")).await?;
            let alerts = body["data"]["groups"].as_array().and_then(|groups| groups.iter().find(|g| g["name"] == "agent-bus").cloned()).unwrap_or_default();
            let last = alerts["lastEvaluation"].as_str().unwrap_or_default().to_owned();
            let at: jiff::Timestamp = last.parse().map_err(|e| format!("{last}: {e}"))?;
            if std::time::SystemTime::from(at) > evaluated_after + std::time::Duration::from_secs(1) {
                Ok(())
            } else {
                Err(last)
            }
        })
        .await;
        assert!(firing().await.unwrap().is_empty(), "${one}/h is under the $8/h threshold");

        let (status, second) = dispatcher.post(&key, "/v1/tasks", &expensive, None).await;
        assert_eq!(status, 201, "{second}");
        let second_id = second["id"].as_str().unwrap().to_owned();
        dispatcher.wait_for_state(&key, &second_id, &["running"]).await;

        let alert = poll_until("AgentBusHighCostRate to reach alertmanager", CLUSTER_TIMEOUT, || async {
            let body = get_json(
                &http,
                &format!("http://127.0.0.1:{alertmanager_port}/api/v2/alerts?filter={}", urlencode("alertname=\"AgentBusHighCostRate\"")),
            )
            .await?;
            match body.as_array().and_then(|alerts| alerts.iter().find(|a| a["status"]["state"] == "active").cloned()) {
                Some(alert) => Ok(alert),
                None => Err(format!("alertmanager: {body}; prometheus: {}", firing_summary(&http, &prometheus).await)),
            }
        })
        .await;
        assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
        assert_eq!(alert["labels"]["category"], "cost", "{alert}");
        let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
        assert!(summary.contains("10.04"), "the summary says the rate: {summary}");

        // Routed as the shipped configuration says: finance (category=cost, continue) and
        // chat (severity=warning); the pager stays quiet.
        let paths = poll_until("the webhooks to be called", CLUSTER_TIMEOUT, || async {
            let received = notifications.lock().unwrap().clone();
            let paths: Vec<String> = received
                .iter()
                .filter(|(_, body)| body["commonLabels"]["alertname"] == "AgentBusHighCostRate")
                .map(|(path, _)| path.clone())
                .collect();
            if paths.iter().any(|p| p == "/agent-bus/cost") && paths.iter().any(|p| p == "/agent-bus/warning") {
                Ok(paths)
            } else {
                Err(format!("{received:?}"))
            }
        })
        .await;
        assert!(!paths.iter().any(|p| p == "/agent-bus/critical"), "{paths:?}");

        for id in [&first_id, &second_id] {
            let (status, _) = dispatcher.post(&key, &format!("/v1/tasks/{id}/cancel"), &json!({}), None).await;
            assert_eq!(status, 200);
        }
        let _ = std::fs::remove_dir_all(&work);
    })
    .await;
}

/// What Prometheus says is firing, for failure messages.
async fn firing_summary(http: &reqwest::Client, prometheus: &str) -> String {
    get_json(http, &format!("{prometheus}/api/v1/alerts"))
        .await
        .map_or_else(|e| e, |body| body["data"]["alerts"].to_string())
}

/// Percent-encodes a query parameter value.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
