//! The chart as operators use it: as a subchart with `global` values, with common and pod
//! labels, priority classes, extra volumes and environment; ServiceMonitor and
//! PrometheusRule picked up by kube-prometheus-stack's selector; the Grafana dashboard for
//! the sidecar; an Ingress for the public API only; the dev image.

use crate::support::*;
use serde_json::{Value, json};
use testsupport::unique_suffix;

const DASHBOARD: &str = "deploy/grafana/agent-bus-dashboard.json";

fn labels(object: &Value) -> &Value {
    &object["metadata"]["labels"]
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

pub(crate) fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|item| item["name"] == name)
}

// --- a subchart with global values -------------------------------------------------------------

#[test]
fn the_chart_renders_and_passes_a_server_side_dry_run_as_a_subchart_with_global_values() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_crds();
    let names = Names::unique("deploy-subchart");
    // A parent chart with agent-bus as its dependency, vendored into charts/ as
    // `helm dependency build` would put it.
    let parent = std::env::temp_dir().join(format!("agent-bus-parent-{}", unique_suffix()));
    copy_tree(
        &repo_root().join("helm/agent-bus"),
        &parent.join("charts/agent-bus"),
    );
    std::fs::write(
        parent.join("Chart.yaml"),
        "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n  - name: agent-bus\n    \
         version: 0.1.0\n    repository: file://charts/agent-bus\n",
    )
    .unwrap();
    // `global` as umbrella charts set it: the two keys agent-bus reads and others it
    // ignores (a bitnami chart's storageClass, anything of the parent's own).
    let values = format!(
        "global:\n  imageRegistry: registry.example.com\n  imagePullSecrets: [regcred]\n  \
         storageClass: fast\n  platform: {{region: eu}}\nagent-bus:\n  tasks:\n    namespace: {tasks}\n  \
         commonLabels: {{team: ml}}\n  monitoring:\n    serviceMonitor: {{enabled: true}}\n    \
         prometheusRule: {{enabled: true}}\n  dashboards: {{enabled: true}}\n",
        tasks = names.tasks
    );
    std::fs::write(parent.join("values.yaml"), values).unwrap();
    let dir = parent.to_str().unwrap();
    let lint = helm(&["lint", "--strict", dir]);
    assert!(
        lint.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{}",
        lint.stdout
    );
    let rendered = helm(&[
        "template",
        "platform",
        dir,
        "--namespace",
        &names.dispatcher,
        "--kube-version",
        "v1.34.4",
    ])
    .stdout;
    std::fs::remove_dir_all(&parent).unwrap();

    let objects = parsed(&rendered);
    for object in &objects {
        assert_eq!(
            labels(object)["team"],
            "ml",
            "{} {}",
            object["kind"],
            object["metadata"]["name"]
        );
    }
    let image = "registry.example.com/agent-bus/agent-bus:0.1.0";
    for role in ["api", "launcher", "watcher"] {
        let deployment = find(
            &objects,
            "Deployment",
            &format!("platform-agent-bus-{role}"),
        );
        let container = dispatcher_container(deployment).unwrap();
        assert_eq!(container["image"], image, "{role}");
        assert_eq!(
            env_value(container, "AGENT_BUS_RUNNER_IMAGE"),
            image,
            "{role}"
        );
        assert_eq!(
            pod_spec(deployment)["imagePullSecrets"],
            json!([{"name": "regcred"}]),
            "{role}"
        );
    }
    find(&objects, "PrometheusRule", "platform-agent-bus");
    find(&objects, "ConfigMap", "platform-agent-bus-dashboard");

    let outcome = std::panic::catch_unwind(|| server_side_dry_run(&rendered, &names));
    delete_namespaces(&names);
    let items = outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let kinds: Vec<&str> = items.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    for kind in ["Deployment", "ServiceMonitor", "PrometheusRule", "Pod"] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
}

// --- labels, priority, volumes and environment -----------------------------------------------

const EXTRAS: &str = r#"
commonLabels: {team: ml, cost-center: "42"}
priorityClassName: agent-bus-high
api:
  podLabels: {tier: front}
  podAnnotations: {example.com/scrape: "no"}
  extraVolumes:
    - name: certs
      secret: {secretName: api-certs}
  extraVolumeMounts:
    - {name: certs, mountPath: /etc/certs, readOnly: true}
  extraEnv:
    - {name: HTTPS_PROXY, value: "http://proxy.example.com:3128"}
  envFrom:
    - secretRef: {name: api-extra}
    - configMapRef: {name: api-settings}
      prefix: EXTRA_
launcher:
  priorityClassName: agent-bus-low
"#;

#[test]
fn common_labels_pod_labels_priority_classes_extra_volumes_and_env_reach_their_objects() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_crds();
    for values in ["values-dev.yaml", "values-staging.yaml", "values-prod.yaml"] {
        let names = Names::unique("deploy-extras");
        let rendered = helm_template_extra(&names, Some(values), EXTRAS);
        let objects = parsed(&rendered);
        // Every object, and every pod template, carries the common labels; no selector
        // does (a Deployment's selector cannot change after it is created).
        for object in &objects {
            let what = format!(
                "{values}: {} {}",
                object["kind"], object["metadata"]["name"]
            );
            assert_eq!(labels(object)["team"], "ml", "{what}");
            assert_eq!(labels(object)["cost-center"], "42", "{what}");
            if let Some(template) = object["spec"]["template"]["metadata"].as_object() {
                assert_eq!(template["labels"]["team"], "ml", "{what} pod template");
                assert!(
                    object["spec"]["selector"]["matchLabels"]
                        .get("team")
                        .is_none(),
                    "{what}: the selector changed"
                );
            }
        }
        let deployment = |role: &str| find(&objects, "Deployment", &format!("agent-bus-{role}"));
        let api = deployment("api");
        let template = &api["spec"]["template"]["metadata"];
        assert_eq!(template["labels"]["tier"], "front", "{values}");
        assert_eq!(template["labels"]["app.kubernetes.io/component"], "api");
        assert_eq!(template["annotations"]["example.com/scrape"], "no");
        assert!(template["annotations"]["checksum/config"].is_string());
        assert_eq!(pod_spec(api)["priorityClassName"], "agent-bus-high");
        assert_eq!(
            pod_spec(deployment("launcher"))["priorityClassName"],
            "agent-bus-low"
        );
        assert_eq!(
            pod_spec(deployment("watcher"))["priorityClassName"],
            "agent-bus-high"
        );
        assert_eq!(
            named(&pod_spec(api)["volumes"], "certs").unwrap()["secret"]["secretName"],
            "api-certs"
        );
        let container = dispatcher_container(api).unwrap();
        assert_eq!(
            named(&container["volumeMounts"], "certs").unwrap()["mountPath"],
            "/etc/certs"
        );
        assert_eq!(
            env_value(container, "HTTPS_PROXY"),
            "http://proxy.example.com:3128"
        );
        assert_eq!(
            container["envFrom"],
            json!([{"secretRef": {"name": "api-extra"}}, {"configMapRef": {"name": "api-settings"}, "prefix": "EXTRA_"}])
        );
        // Only the api got them.
        for role in ["launcher", "watcher"] {
            let other = deployment(role);
            let container = dispatcher_container(other).unwrap();
            assert!(
                named(&pod_spec(other)["volumes"], "certs").is_none(),
                "{role}"
            );
            assert!(container.get("envFrom").is_none(), "{role}");
            assert!(
                !container["env"].to_string().contains("HTTPS_PROXY"),
                "{role}"
            );
            assert!(
                other["spec"]["template"]["metadata"]["labels"]
                    .get("tier")
                    .is_none(),
                "{role}"
            );
        }
        // Kubernetes takes all of it (the PriorityClasses need not exist for a Deployment).
        let outcome = std::panic::catch_unwind(|| server_side_dry_run(&rendered, &names));
        delete_namespaces(&names);
        outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    }
    // The chart's own label keys cannot be overridden: a selector would stop matching.
    let chart = repo_root().join("helm/agent-bus");
    for bad in [
        "commonLabels.app\\.kubernetes\\.io/name=x",
        "api.podLabels.app\\.kubernetes\\.io/component=x",
        "watcher.podLabels.helm\\.sh/chart=x",
    ] {
        let out = run_status(
            tool("helm"),
            &["lint", chart.to_str().unwrap(), "--set", bad],
            None,
        );
        assert!(!out.success, "helm lint accepted --set {bad}");
    }
}

// --- kube-prometheus-stack ----------------------------------------------------------------------

#[test]
fn kube_prometheus_stack_selects_the_service_monitor_and_the_rule_by_their_labels() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_crds();
    let names = Names::unique("deploy-kps");
    let monitoring_objects = |rendered: &str| -> String {
        yaml_docs(rendered)
            .into_iter()
            .filter(|doc| ["ServiceMonitor", "PrometheusRule"].contains(&kind_of(doc)))
            .collect::<Vec<String>>()
            .join("---\n")
    };
    // kube-prometheus-stack's Prometheus selects `release: <its release>` by default
    // (serviceMonitorSelector, ruleSelector): ask the API server with that selector.
    let selected = |names: &Names| -> Vec<String> {
        let out = kubectl(
            &[
                "get",
                "servicemonitors,prometheusrules",
                "-n",
                &names.dispatcher,
                "-l",
                "release=kube-prometheus-stack",
                "-o",
                "name",
            ],
            None,
        );
        let mut found: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
        found.sort();
        found
    };
    let plain = monitoring_objects(&helm_template(&names, Some("values-prod.yaml")));
    let labelled_render = helm_template_extra(
        &names,
        Some("values-prod.yaml"),
        "monitoring:\n  serviceMonitor:\n    labels: {release: kube-prometheus-stack}\n    \
         annotations: {example.com/owner: platform}\n  prometheusRule:\n    labels: {release: \
         kube-prometheus-stack, role: alert-rules}\n    annotations: {example.com/owner: platform}\n",
    );
    let labelled = monitoring_objects(&labelled_render);
    assert_eq!(yaml_docs(&labelled).len(), 2, "{labelled}");
    let outcome = std::panic::catch_unwind(|| {
        create_namespaces("", &names);
        // Without the values the selector finds nothing...
        kubectl(&["apply", "-f", "-"], Some(&plain));
        assert_eq!(selected(&names), Vec::<String>::new());
        // ...with them, both objects, keeping the chart's own labels.
        kubectl(&["apply", "-f", "-"], Some(&labelled));
        assert_eq!(
            selected(&names),
            [
                "prometheusrule.monitoring.coreos.com/agent-bus",
                "servicemonitor.monitoring.coreos.com/agent-bus"
            ]
        );
        for object in parsed(&labelled) {
            assert_eq!(
                object["metadata"]["annotations"]["example.com/owner"],
                "platform"
            );
            assert_eq!(labels(&object)["app.kubernetes.io/name"], "agent-bus");
        }
        let rule = parsed(&labelled)
            .into_iter()
            .find(|o| o["kind"] == "PrometheusRule")
            .unwrap();
        assert_eq!(labels(&rule)["role"], "alert-rules");
        assert_eq!(labels(&rule)["app.kubernetes.io/component"], "alerting");
    });
    delete_namespaces(&names);
    outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

// --- the Grafana dashboard ----------------------------------------------------------------------

#[test]
fn the_dashboard_config_map_is_labelled_for_the_grafana_sidecar_and_holds_the_dashboard() {
    testsupport::needs_env!(Program("helm"));
    let names = Names::defaults();
    let text = std::fs::read_to_string(repo_root().join(DASHBOARD)).unwrap();
    let checked_in: Value = serde_json::from_str(&text).unwrap();
    let dashboard_map = |rendered: &str| -> Option<Value> {
        parsed(rendered)
            .into_iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "agent-bus-dashboard")
    };
    let json_of = |map: &Value| -> Value {
        let data = map["data"].as_object().unwrap();
        assert_eq!(data.len(), 1, "{data:?}");
        serde_json::from_str(data["agent-bus.json"].as_str().unwrap()).unwrap()
    };
    // Off by default; staging and prod... staging turns it on.
    assert!(dashboard_map(&helm_template(&names, None)).is_none());
    let staging = dashboard_map(&helm_template(&names, Some("values-staging.yaml"))).unwrap();
    assert_eq!(labels(&staging)["grafana_dashboard"], "1");
    assert_eq!(staging["metadata"]["namespace"], "agent-bus");
    assert_eq!(json_of(&staging), checked_in);
    // The label, its value and the namespace are the operator's (kube-prometheus-stack's
    // grafana.sidecar.dashboards.label/labelValue/searchNamespace).
    let custom = dashboard_map(&helm_template_extra(
        &names,
        None,
        "dashboards:\n  enabled: true\n  label: my_dashboards\n  labelValue: \"yes\"\n  \
         namespace: monitoring\n  labels: {team: ml}\n  annotations: {grafana_folder: Agents}\n",
    ))
    .unwrap();
    assert_eq!(labels(&custom)["my_dashboards"], "yes");
    assert!(labels(&custom).get("grafana_dashboard").is_none());
    assert_eq!(labels(&custom)["team"], "ml");
    assert_eq!(custom["metadata"]["namespace"], "monitoring");
    assert_eq!(
        custom["metadata"]["annotations"]["grafana_folder"],
        "Agents"
    );
    assert_eq!(json_of(&custom), checked_in);
    // Its queries follow the alerts' job selector.
    let selector = r#"job="dispatchers",cluster="eu-1""#;
    let moved = dashboard_map(&helm_template_extra(
        &names,
        None,
        &format!(
            "dashboards: {{enabled: true}}\nmonitoring:\n  prometheusRule:\n    jobSelector: '{selector}'\n"
        ),
    ))
    .unwrap();
    let expected: Value =
        serde_json::from_str(&text.replace(r#"job=\"agent-bus\""#, &selector.replace('"', "\\\"")))
            .unwrap();
    assert_ne!(expected, checked_in);
    assert_eq!(json_of(&moved), expected);
}

// --- the Ingress ---------------------------------------------------------------------------------

/// Whether an Ingress path rule routes the request path `path`.
fn routes(rule: &Value, path: &str) -> bool {
    let prefix = rule["path"].as_str().unwrap();
    match rule["pathType"].as_str().unwrap() {
        "Exact" => path == prefix,
        "Prefix" => {
            let prefix = prefix.trim_end_matches('/');
            path == prefix || path.starts_with(&format!("{prefix}/"))
        }
        other => panic!("pathType {other}: the API's Ingress uses Exact and Prefix only"),
    }
}

#[test]
fn the_ingress_routes_the_public_api_and_nothing_else() {
    testsupport::needs_env!(Program("kubectl"), Program("helm"));
    let names = Names::defaults();
    let openapi: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("docs/openapi.json")).unwrap(),
    )
    .unwrap();
    let mut paths: Vec<String> = openapi["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    paths.extend(
        [
            "/metrics",
            "/",
            "/v1",
            "/v1x",
            "/openapi.json",
            "/openapi.jsonx",
        ]
        .map(str::to_owned),
    );
    assert!(
        paths.iter().any(|p| p.starts_with("/internal/")),
        "{paths:?}"
    );
    for (source, rendered) in [
        (
            "helm values-staging.yaml",
            helm_template(&names, Some("values-staging.yaml")),
        ),
        (
            "helm values-prod.yaml",
            helm_template(&names, Some("values-prod.yaml")),
        ),
        ("manifests/overlays/staging", kustomize("staging", &names)),
        ("manifests/overlays/prod", kustomize("prod", &names)),
    ] {
        let objects = parsed(&rendered);
        let ingresses: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Ingress").collect();
        assert_eq!(ingresses.len(), 1, "{source}");
        let spec = &ingresses[0]["spec"];
        assert!(
            spec.get("defaultBackend").is_none(),
            "{source}: a default backend"
        );
        assert!(
            !spec["tls"].as_array().unwrap().is_empty(),
            "{source}: no TLS"
        );
        let rules = spec["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 1, "{source}");
        let http_paths = rules[0]["http"]["paths"].as_array().unwrap();
        for rule in http_paths {
            assert_eq!(
                rule["backend"]["service"]["name"], "agent-bus-api",
                "{source}"
            );
            assert_eq!(
                rule["backend"]["service"]["port"]["name"], "http",
                "{source}"
            );
        }
        // Exactly the public API: /v1/... and the OpenAPI document; never the probes,
        // the runners' /internal reports or /metrics.
        for path in &paths {
            let routed = http_paths.iter().any(|rule| routes(rule, path));
            let public = path == "/v1" || path.starts_with("/v1/") || path == "/openapi.json";
            assert_eq!(routed, public, "{source}: {path}");
        }
    }
}

// --- the dev image -------------------------------------------------------------------------------

#[test]
fn the_dev_values_and_overlay_run_the_image_the_test_suite_builds_never_pulled() {
    testsupport::needs_env!(Program("kubectl"), Program("helm"));
    let names = Names::defaults();
    let image = "localhost/agent-bus:dev";
    let chart = parsed(&helm_template(&names, Some("values-dev.yaml")));
    let overlay = parsed(&kustomize("dev", &names));
    for (source, objects) in [
        ("helm values-dev.yaml", &chart),
        ("manifests/overlays/dev", &overlay),
    ] {
        for deployment in dispatcher_deployments(objects) {
            let container = dispatcher_container(deployment).unwrap();
            assert_eq!(container["image"], image, "{source}");
            assert_eq!(container["imagePullPolicy"], "Never", "{source}");
            assert_eq!(
                env_value(container, "AGENT_BUS_RUNNER_IMAGE"),
                image,
                "{source}"
            );
        }
    }
    for deployment in dispatcher_deployments(&chart) {
        let container = dispatcher_container(deployment).unwrap();
        assert_eq!(
            env_value(container, "AGENT_BUS_RUNNER_IMAGE_PULL_POLICY"),
            "Never"
        );
    }
}
