//! Alerting and dashboards: the alert rules in their three copies with promtool tests,
//! the Alertmanager example and the Grafana dashboard.

use crate::support::*;
use serde_json::Value;

// --- alerting and dashboards -------------------------------------------------------------------

const RULES: &str = "deploy/prometheus/agent-bus.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/tests";
const RUNBOOKS: &str = "https://github.com/agent-bus/agent-bus/blob/main/docs/RUNBOOK.md#";
const RUNBOOK_DOC: &str = "docs/RUNBOOK.md";
/// How every selector of the rules names the dispatchers' series (the chart replaces it).
const JOB: &str = r#"job="agent-bus""#;

/// The alerts docs/OBSERVABILITY.md and docs/RUNBOOK.md document.
const ALERTS: [&str; 16] = [
    "AgentBusDispatcherDown",
    "AgentBusHighApiErrorRate",
    "AgentBusLaunchFailures",
    "AgentBusRetryStorm",
    "AgentBusHighTaskFailureRate",
    "AgentBusTasksFailingAcrossQueues",
    "AgentBusTasksQueuedTooLong",
    "AgentBusTasksUnschedulable",
    "AgentBusHeartbeatLost",
    "AgentBusQueueAgeGrowing",
    "AgentBusDispatchLatencyBudgetBurn",
    "AgentBusHighCostRate",
    "AgentBusTenantBudgetExceeded",
    "AgentBusIdleGpus",
    "AgentBusDependencyErrors",
    "AgentBusMetricsSnapshotStale",
];

/// The `spec.groups` of the one PrometheusRule in rendered YAML, parsed here (no cluster
/// needed: helm template and kubectl kustomize run offline).
fn prometheus_rule_groups(rendered: &str) -> Value {
    let docs: Vec<String> = yaml_docs(rendered)
        .into_iter()
        .filter(|doc| kind_of(doc) == "PrometheusRule")
        .collect();
    assert_eq!(docs.len(), 1, "one PrometheusRule: {docs:?}");
    let rule = yaml(&docs[0]);
    assert_eq!(rule["metadata"]["name"], "agent-bus");
    rule["spec"]["groups"].clone()
}

/// The sample names the dispatcher exposes: gauges as they are, counters with `_total`,
/// histograms as their `_bucket`, `_sum` and `_count` series. From the families the
/// metrics module describes (the encoder leaves a family without samples out of the
/// text) and from the encoded text.
fn exposed_sample_names() -> std::collections::BTreeSet<String> {
    use dispatcher::metrics::{Kind, Metrics, family_names};
    let metrics = Metrics::new("x");
    let mut names = std::collections::BTreeSet::new();
    for family in metrics.described() {
        if family.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{}{suffix}", family.name));
            }
        } else {
            names.insert(family.name.clone());
        }
    }
    let text = metrics.encode().unwrap();
    for name in family_names(&text) {
        assert!(
            text.contains(&format!("# TYPE {name} histogram\n")) || names.contains(&name),
            "{name} is exposed but not described"
        );
    }
    assert!(names.len() > 30, "{names:?}");
    names
}

/// The `agent_bus_…` and standard `process_…` metric and `agent_bus:…` recording-rule
/// names a PromQL text mentions that are neither exposed by the dispatcher nor recorded
/// by the rules.
fn unknown_names(
    promql: &str,
    exposed: &std::collections::BTreeSet<String>,
    recorded: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut unknown = Vec::new();
    let starts = promql
        .match_indices("agent_bus")
        .chain(promql.match_indices("process_"));
    for (start, _) in starts {
        if promql[..start].chars().next_back().is_some_and(is_name) {
            continue;
        }
        let end = promql[start..]
            .find(|c: char| !is_name(c))
            .map_or(promql.len(), |n| start + n);
        let name = &promql[start..end];
        let known = if name.contains(':') {
            recorded.contains(name)
        } else {
            exposed.contains(name)
        };
        if !known {
            unknown.push(name.to_owned());
        }
    }
    unknown
}

/// `value` with every `(from, to)` replaced in each of its strings.
fn replaced(value: &Value, replacements: &[(&str, &str)]) -> Value {
    match value {
        Value::String(text) => Value::String(
            replacements
                .iter()
                .fold(text.clone(), |text, (from, to)| text.replace(from, to)),
        ),
        Value::Array(items) => {
            Value::Array(items.iter().map(|i| replaced(i, replacements)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), replaced(v, replacements)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Every string in `value`.
fn all_strings(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::String(text) => found.push(text.clone()),
        Value::Array(items) => items.iter().for_each(|i| all_strings(i, found)),
        Value::Object(map) => map.values().for_each(|v| all_strings(v, found)),
        _ => {}
    }
}

/// The selectors of a PromQL expression that do not name [`JOB`]: every `agent_bus_…`
/// metric and `up` must be followed by `{…}` holding it, so that the chart's job selector
/// reaches every series the rules read.
fn selectors_without_job(promql: &str) -> Vec<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut missing = Vec::new();
    for needle in ["agent_bus_", "up{"] {
        for (start, _) in promql.match_indices(needle) {
            if promql[..start].chars().next_back().is_some_and(is_name) {
                continue;
            }
            let end = promql[start..]
                .find(|c: char| !is_name(c))
                .map_or(promql.len(), |n| start + n);
            let selector = promql[end..]
                .strip_prefix('{')
                .and_then(|rest| rest.split_once('}'))
                .map(|(inside, _)| inside);
            if !selector.is_some_and(|inside| inside.contains(JOB)) {
                missing.push(promql[start..end].to_owned());
            }
        }
    }
    missing
}

/// Every PromQL text of a Grafana dashboard: the targets' `expr`, the variables' `query`
/// and `definition`.
fn dashboard_promql(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match value {
                    Value::String(text)
                        if matches!(key.as_str(), "expr" | "query" | "definition") =>
                    {
                        found.push(text.clone());
                    }
                    _ => dashboard_promql(value, found),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                dashboard_promql(item, found);
            }
        }
        _ => {}
    }
}

#[test]
fn the_alert_rules_agree_in_their_three_copies_and_pass_their_promtool_tests() {
    testsupport::needs_env!(Program("kubectl"), Program("helm"), Program("promtool"));
    // The copies are what deploy/prometheus/sync makes of the source.
    let sync = run(
        repo_root().join("deploy/prometheus/sync"),
        &["--check"],
        None,
    );
    assert_eq!(sync.stdout, "", "{}", sync.stderr);
    let out = run(tool("promtool"), &["check", "rules", RULES], None);
    assert!(out.stdout.contains("SUCCESS"), "{}", out.stdout);
    let mut tests: Vec<String> = std::fs::read_dir(repo_root().join(RULE_TESTS))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".test.yml"))
        .map(|name| format!("{RULE_TESTS}/{name}"))
        .collect();
    tests.sort();
    assert!(!tests.is_empty());
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let out = run(tool("promtool"), &args, None);
    assert_eq!(
        out.stdout.matches("SUCCESS").count(),
        tests.len(),
        "{}",
        out.stdout
    );

    // The chart and the prod overlay ship the source's groups.
    let text = std::fs::read_to_string(repo_root().join(RULES)).unwrap();
    let source = yaml(&text);
    let groups = source["groups"].clone();
    let names = Names {
        dispatcher: "agent-bus".to_owned(),
        tasks: "agent-bus-tasks".to_owned(),
    };
    for overlay in ["staging", "prod"] {
        assert_eq!(
            prometheus_rule_groups(&kustomize(overlay, &names)),
            groups,
            "manifests/overlays/{overlay}"
        );
    }
    for values in ["values-staging.yaml", "values-prod.yaml"] {
        assert_eq!(
            prometheus_rule_groups(&helm_template(&names, Some(values))),
            groups,
            "helm/agent-bus with {values}"
        );
    }
    // The chart takes the job selector and the runbooks' address from its values: the
    // source's groups with both replaced, in expressions and in the annotations' quoted
    // queries, and still valid rules.
    let selector = r#"job="dispatchers",cluster="eu-1""#;
    let escaped = selector.replace('"', "\\\"");
    let runbooks = "https://wiki.example.com/runbooks/agent-bus";
    let custom = prometheus_rule_groups(&helm_template_extra(
        &names,
        Some("values-prod.yaml"),
        &format!(
            "monitoring:\n  prometheusRule:\n    jobSelector: '{selector}'\n    runbookBaseUrl: {runbooks}\n"
        ),
    ));
    let expected = replaced(
        &groups,
        &[
            (JOB, selector),
            (r#"job=\"agent-bus\""#, &escaped),
            (RUNBOOKS, &format!("{runbooks}#")),
        ],
    );
    assert_ne!(expected, groups);
    assert_eq!(
        custom, expected,
        "helm/agent-bus with a jobSelector and runbookBaseUrl"
    );
    let mut strings = Vec::new();
    all_strings(&custom, &mut strings);
    for text in &strings {
        assert!(
            !text.contains("agent-bus\\\"") && !text.contains(JOB),
            "left: {text}"
        );
        assert!(
            !text.contains("docs/RUNBOOK.md"),
            "a runbook link was left: {text}"
        );
    }
    // monitoring.job alone moves the selector and the ServiceMonitor's job label together.
    let renamed = helm_template_set(&names, Some("values-prod.yaml"), &["monitoring.job=ab"]);
    assert_eq!(
        prometheus_rule_groups(&renamed),
        replaced(
            &groups,
            &[
                (JOB, r#"job="ab""#),
                (r#"job=\"agent-bus\""#, r#"job=\"ab\""#)
            ]
        )
    );
    let monitor = yaml(
        &yaml_docs(&renamed)
            .into_iter()
            .find(|doc| kind_of(doc) == "ServiceMonitor")
            .unwrap(),
    );
    let relabelings = &monitor["spec"]["endpoints"][0]["relabelings"];
    assert!(
        relabelings
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["targetLabel"] == "job" && r["replacement"] == "ab"),
        "{relabelings}"
    );
    let file = std::env::temp_dir().join(format!(
        "agent-bus-rules-{}.yml",
        testsupport::unique_suffix()
    ));
    std::fs::write(&file, serde_json::json!({"groups": custom}).to_string()).unwrap();
    let out = run(
        tool("promtool"),
        &["check", "rules", file.to_str().unwrap()],
        None,
    );
    std::fs::remove_file(&file).unwrap();
    assert!(out.stdout.contains("SUCCESS"), "{}", out.stdout);

    // Each alert: the documented set, labels, runbook anchor, a promtool test, and its
    // `for:` on a line of its own (the end-to-end test shortens them with a regex).
    let exposed = exposed_sample_names();
    let mut recorded = std::collections::BTreeSet::new();
    let mut alerts = std::collections::BTreeSet::new();
    let test_text: String = tests
        .iter()
        .map(|t| std::fs::read_to_string(repo_root().join(t)).unwrap())
        .collect();
    let rules: Vec<&Value> = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .collect();
    for rule in &rules {
        if let Some(record) = rule["record"].as_str() {
            assert!(record.starts_with("agent_bus:"), "{record}");
            recorded.insert(record.to_owned());
        }
    }
    let runbook = std::fs::read_to_string(repo_root().join(RUNBOOK_DOC)).unwrap();
    let mut alert_rules = 0;
    for rule in &rules {
        let expr = rule["expr"].as_str().unwrap();
        let unselected = selectors_without_job(expr);
        assert!(
            unselected.is_empty(),
            "{RULES}: {unselected:?} without {JOB} in {expr}"
        );
        let unknown = unknown_names(expr, &exposed, &recorded);
        assert!(
            unknown.is_empty(),
            "{RULES} names unknown {unknown:?} in {expr}"
        );
        let Some(alert) = rule["alert"].as_str() else {
            continue;
        };
        alert_rules += 1;
        alerts.insert(alert.to_owned());
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{alert}: severity {severity:?}"
        );
        let category = rule["labels"]["category"].as_str().unwrap_or_default();
        assert!(
            ["availability", "tasks", "cost", "capacity", "dependencies"].contains(&category),
            "{alert}: category {category:?}"
        );
        let annotations = &rule["annotations"];
        assert_eq!(
            annotations["runbook_url"],
            format!("{RUNBOOKS}{}", alert.to_lowercase()),
            "{alert}"
        );
        for key in ["summary", "description"] {
            assert!(
                annotations[key].as_str().is_some_and(|t| !t.is_empty()),
                "{alert}: no {key}"
            );
        }
        assert!(rule["for"].is_string(), "{alert}: no for");
        // Its runbook: a section of docs/RUNBOOK.md with the three parts.
        let section = runbook
            .split("\n## ")
            .find(|section| section.lines().next() == Some(alert))
            .unwrap_or_else(|| panic!("{RUNBOOK_DOC} has no `## {alert}` section"));
        for part in ["**What it means.**", "**How to check.**", "**What to do.**"] {
            assert!(section.contains(part), "{RUNBOOK_DOC} {alert}: no {part}");
        }
        for annotation in annotations.as_object().unwrap().values() {
            let text = annotation.as_str().unwrap();
            let unknown = unknown_names(text, &exposed, &recorded);
            assert!(unknown.is_empty(), "{alert} names unknown {unknown:?}");
        }
        assert!(
            test_text.contains(&format!("alertname: {alert}\n")),
            "no promtool test of {alert} in {RULE_TESTS}"
        );
        if alert == "AgentBusHighCostRate" {
            assert!(
                !expr.contains("rate(") && !expr.contains("increase("),
                "AgentBusHighCostRate fires from the gauges alone: {expr}"
            );
        }
    }
    assert_eq!(
        alerts,
        ALERTS
            .iter()
            .map(|a| (*a).to_owned())
            .collect::<std::collections::BTreeSet<String>>(),
        "the alerts of {RULES}"
    );
    let for_lines = text
        .lines()
        .filter(|line| {
            line.trim_start()
                .strip_prefix("for: ")
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_alphanumeric()))
        })
        .count();
    assert_eq!(
        for_lines, alert_rules,
        "one `for: <duration>` line per alert"
    );
}

#[test]
fn the_alertmanager_example_and_the_dashboard_are_valid_and_name_only_real_metrics() {
    testsupport::needs_env!(Program("amtool"));
    let out = run(
        tool("amtool"),
        &["check-config", "deploy/alertmanager/alertmanager.yml"],
        None,
    );
    assert!(out.stdout.contains("SUCCESS"), "{}", out.stdout);
    // Routing: critical pages, warning to chat, info nowhere, cost also to finance.
    for (labels, receivers) in [
        (&["severity=critical", "category=availability"][..], "pager"),
        (&["severity=warning", "category=tasks"][..], "chat"),
        (&["severity=warning", "category=cost"][..], "finance,chat"),
        (&["severity=info", "category=cost"][..], "finance,null"),
        (&["severity=info", "category=capacity"][..], "null"),
    ] {
        let mut args = vec![
            "config",
            "routes",
            "test",
            "--config.file=deploy/alertmanager/alertmanager.yml",
        ];
        args.extend(labels);
        let out = run(tool("amtool"), &args, None);
        assert_eq!(out.stdout.trim(), receivers, "{labels:?}");
    }

    let text = std::fs::read_to_string(repo_root().join("deploy/grafana/agent-bus-dashboard.json"))
        .unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dashboard["schemaVersion"], 39);
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    for name in ["tenant", "queue"] {
        assert_eq!(variable(name)["datasource"]["uid"], "${datasource}");
    }
    let rules = yaml(&std::fs::read_to_string(repo_root().join(RULES)).unwrap());
    let recorded = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .filter_map(|rule| rule["record"].as_str().map(str::to_owned))
        .collect();
    let exposed = exposed_sample_names();
    let mut queries = Vec::new();
    dashboard_promql(&dashboard, &mut queries);
    let exprs = queries.iter().filter(|q| q.contains("agent_bus")).count();
    assert!(exprs > 40, "{exprs} expressions");
    for query in &queries {
        let unknown = unknown_names(query, &exposed, &recorded);
        assert!(
            unknown.is_empty(),
            "the dashboard names unknown {unknown:?} in {query}"
        );
    }
    // Every panel queries the data source variable.
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
        }
    }
}
