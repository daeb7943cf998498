//! Network policies: task pods reach the API at the report URL through both of them.

use crate::support::*;
use serde_json::{Value, json};

/// `matchLabels` of `selector` (absent: everything) are all among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "matchExpressions are not evaluated here: {selector}"
    );
    selector["matchLabels"]
        .as_object()
        .is_none_or(|wanted| wanted.iter().all(|(k, v)| labels[k] == *v))
}

/// A pod in a namespace, as a NetworkPolicy sees it.
struct PodAt<'a> {
    namespace: &'a str,
    labels: &'a Value,
}

/// Whether a NetworkPolicy peer (`from`/`to` entry) includes `pod`.
fn peer_includes(peer: &Value, policy_namespace: &str, pod: &PodAt) -> bool {
    if !peer["ipBlock"].is_null() {
        return false;
    }
    let namespace_ok = if peer["namespaceSelector"].is_null() {
        pod.namespace == policy_namespace
    } else {
        selects(
            &peer["namespaceSelector"],
            &json!({"kubernetes.io/metadata.name": pod.namespace}),
        )
    };
    namespace_ok && (peer["podSelector"].is_null() || selects(&peer["podSelector"], pod.labels))
}

/// Whether a NetworkPolicy rule's ports include TCP `port` (no ports: all of them).
fn rule_allows_port(rule: &Value, port: i64) -> bool {
    rule["ports"].as_array().is_none_or(|ports| {
        ports.iter().any(|p| {
            p["port"].as_i64() == Some(port) && p["protocol"].as_str().unwrap_or("TCP") == "TCP"
        })
    })
}

/// The NetworkPolicies of `objects` that govern `direction` (`Ingress`/`Egress`) of `pod`.
fn policies_for<'a>(objects: &'a [Value], pod: &PodAt, direction: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| {
            o["kind"] == "NetworkPolicy"
                && o["metadata"]["namespace"] == pod.namespace
                && selects(&o["spec"]["podSelector"], pod.labels)
                && o["spec"]["policyTypes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t == direction)
        })
        .collect()
}

/// For one rendered installation: every role's AGENT_BUS_REPORT_URL is the api Service
/// in the dispatcher namespace; that Service leads to the api pods' port; the tasks
/// namespace's policies let task pods out to exactly that pod port, and the dispatcher's
/// let them in; the runner image is the dispatcher's own and the report secret an
/// optional key of the dispatcher's Secret.
fn assert_reports_reach_the_api(source: &str, objects: &[Value]) {
    let deployments = dispatcher_deployments(objects);
    let first = dispatcher_container(deployments[0]).unwrap();
    let url = env_value(first, "AGENT_BUS_REPORT_URL");
    let tasks_namespace = env_value(first, "AGENT_BUS_NAMESPACE");
    let (host, port) = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once(':'))
        .unwrap_or_else(|| panic!("{source}: report URL {url} is not http://host:port"));
    let port: i64 = port.parse().unwrap();
    let host: Vec<&str> = host.split('.').collect();
    let [service_name, namespace, "svc"] = host[..] else {
        panic!("{source}: report URL {url} is not http://<service>.<namespace>.svc:<port>");
    };
    for deployment in &deployments {
        let container = dispatcher_container(deployment).unwrap();
        let name = &deployment["metadata"]["name"];
        assert_eq!(
            deployment["metadata"]["namespace"], namespace,
            "{source} {name}"
        );
        assert_eq!(
            env_value(container, "AGENT_BUS_REPORT_URL"),
            url,
            "{source} {name}"
        );
        assert_eq!(
            env_value(container, "AGENT_BUS_NAMESPACE"),
            tasks_namespace,
            "{source} {name}"
        );
        // The init container of every task pod is the dispatcher's own image.
        assert_eq!(
            env_value(container, "AGENT_BUS_RUNNER_IMAGE"),
            container["image"].as_str().unwrap(),
            "{source} {name}"
        );
        // The report secret is an optional key of the Secret the database URL is in.
        let database = &env_entry(container, "DATABASE_URL")["valueFrom"]["secretKeyRef"];
        assert_eq!(
            env_entry(container, "AGENT_BUS_REPORT_SECRET")["valueFrom"]["secretKeyRef"],
            json!({"name": database["name"], "key": "report-secret", "optional": true}),
            "{source} {name}"
        );
    }
    let service = find(objects, "Service", service_name);
    assert_eq!(service["metadata"]["namespace"], namespace, "{source}");
    let service_port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"].as_i64() == Some(port))
        .unwrap_or_else(|| panic!("{source}: Service {service_name} has no port {port}"));
    let api: Vec<&&Value> = deployments
        .iter()
        .filter(|d| {
            selects(
                &json!({"matchLabels": service["spec"]["selector"]}),
                &d["spec"]["template"]["metadata"]["labels"],
            )
        })
        .collect();
    assert_eq!(api.len(), 1, "{source}: the Service selects one role");
    assert_eq!(
        api[0]["metadata"]["labels"]["app.kubernetes.io/component"],
        "api"
    );
    let api_labels = &api[0]["spec"]["template"]["metadata"]["labels"];
    let pod_port =
        dispatcher_container(api[0]).unwrap()["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["name"] == service_port["targetPort"]
                    || p["containerPort"] == service_port["targetPort"]
            })
            .unwrap_or_else(|| {
                panic!("{source}: no container port {}", service_port["targetPort"])
            })["containerPort"]
            .as_i64()
            .unwrap();
    assert_eq!(pod_port, 8080, "{source}");

    let api_pod = PodAt {
        namespace,
        labels: api_labels,
    };
    let task_labels = json!({"app.kubernetes.io/managed-by": "agent-bus"});
    let task_pod = PodAt {
        namespace: tasks_namespace,
        labels: &task_labels,
    };
    // Out of a task pod: policies apply (so everything else is denied), and one lets it
    // reach the api pods on their port.
    let egress = policies_for(objects, &task_pod, "Egress");
    assert!(
        !egress.is_empty(),
        "{source}: task pods' egress is not restricted"
    );
    assert!(
        egress.iter().any(|policy| {
            policy["spec"]["egress"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| {
                    rule_allows_port(rule, pod_port)
                        && rule["to"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|peer| peer_includes(peer, tasks_namespace, &api_pod))
                })
        }),
        "{source}: no egress from {tasks_namespace} to the api pods on {pod_port}"
    );
    // Into an api pod: policies apply, and one lets task pods in on that port.
    let ingress = policies_for(objects, &api_pod, "Ingress");
    assert!(
        !ingress.is_empty(),
        "{source}: the api's ingress is not restricted"
    );
    assert!(
        ingress.iter().any(|policy| {
            policy["spec"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| {
                    rule_allows_port(rule, pod_port)
                        && rule["from"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|peer| peer_includes(peer, namespace, &task_pod))
                })
        }),
        "{source}: no ingress into the api pods from {tasks_namespace} on {pod_port}"
    );
}

#[test]
fn task_pods_reach_the_api_at_the_report_url_through_both_network_policies() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_crds();
    let defaults = Names::defaults();
    let renamed = Names::unique("deploy-report");
    let installations = [
        ("helm (default values)", helm_template(&defaults, None)),
        (
            "helm -f values-prod.yaml, renamed",
            helm_template(&renamed, Some("values-prod.yaml")),
        ),
        // The URL names the Service's port; the policies the pods' port.
        (
            "helm, fullnameOverride=ab, service.port=80",
            helm_template_set(&renamed, None, &["fullnameOverride=ab", "service.port=80"]),
        ),
        ("manifests/overlays/dev", kustomize("dev", &defaults)),
        (
            "manifests/overlays/dev, renamed",
            kustomize("dev", &renamed),
        ),
        (
            "helm -f values-staging.yaml, renamed",
            helm_template(&renamed, Some("values-staging.yaml")),
        ),
        (
            "manifests/overlays/staging, renamed",
            kustomize("staging", &renamed),
        ),
        (
            "manifests/overlays/prod, renamed",
            kustomize("prod", &renamed),
        ),
    ];
    for (source, rendered) in &installations {
        assert_reports_reach_the_api(source, &objects(rendered));
    }
    let port_80 = objects(&installations[2].1);
    assert_eq!(
        env_value(
            dispatcher_container(find(&port_80, "Deployment", "ab-launcher")).unwrap(),
            "AGENT_BUS_REPORT_URL"
        ),
        format!("http://ab-api.{}.svc:80", renamed.dispatcher)
    );
    // runner.reportUrl replaces the in-cluster URL (e.g. a route through a gateway).
    let overridden = objects(&helm_template_set(
        &defaults,
        None,
        &["runner.reportUrl=https://reports.example.com/agent-bus"],
    ));
    for deployment in dispatcher_deployments(&overridden) {
        assert_eq!(
            env_value(
                dispatcher_container(deployment).unwrap(),
                "AGENT_BUS_REPORT_URL"
            ),
            "https://reports.example.com/agent-bus"
        );
    }
}

/// The container port named `name` of the dispatcher container of `deployment`.
fn named_port(deployment: &Value, name: &str) -> i64 {
    dispatcher_container(deployment).unwrap()["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
        .as_i64()
        .unwrap()
}

/// Whether some ingress rule of the policies governing `pod` lets `peer` in on `port`.
fn ingress_allows(objects: &[Value], pod: &PodAt, peer: &PodAt, port: i64) -> bool {
    policies_for(objects, pod, "Ingress").iter().any(|policy| {
        policy["spec"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                rule_allows_port(rule, port)
                    && rule["from"].as_array().is_none_or(|from| {
                        from.iter().any(|p| peer_includes(p, pod.namespace, peer))
                    })
            })
    })
}

/// For one rendered installation: every role serves `/metrics` on its own port named
/// `metrics` (AGENT_BUS_METRICS_LISTEN), apart from the api's; task pods cannot reach it
/// (the dispatcher's ingress is restricted and no rule lets the tasks namespace in on it)
/// while Prometheus' namespace can; a ServiceMonitor, where there is one, scrapes that
/// port; an Ingress, where there is one, routes only `/v1` and `/openapi.json`.
fn assert_metrics_stay_inside(source: &str, objects: &[Value], prometheus_namespace: &str) {
    let deployments = dispatcher_deployments(objects);
    assert_eq!(deployments.len(), 3, "{source}");
    let tasks_namespace = env_value(
        dispatcher_container(deployments[0]).unwrap(),
        "AGENT_BUS_NAMESPACE",
    )
    .to_owned();
    let task_labels = json!({"app.kubernetes.io/managed-by": "agent-bus"});
    let task_pod = PodAt {
        namespace: &tasks_namespace,
        labels: &task_labels,
    };
    let no_labels = json!({});
    let prometheus = PodAt {
        namespace: prometheus_namespace,
        labels: &no_labels,
    };
    for deployment in &deployments {
        let name = &deployment["metadata"]["name"];
        let container = dispatcher_container(deployment).unwrap();
        let metrics_port = named_port(deployment, "metrics");
        assert_ne!(
            metrics_port,
            named_port(deployment, "http"),
            "{source} {name}"
        );
        assert_eq!(
            env_value(container, "AGENT_BUS_METRICS_LISTEN"),
            format!("0.0.0.0:{metrics_port}"),
            "{source} {name}"
        );
        let pod = PodAt {
            namespace: deployment["metadata"]["namespace"].as_str().unwrap(),
            labels: &deployment["spec"]["template"]["metadata"]["labels"],
        };
        assert!(
            !policies_for(objects, &pod, "Ingress").is_empty(),
            "{source} {name}: ingress is not restricted"
        );
        assert!(
            !ingress_allows(objects, &pod, &task_pod, metrics_port),
            "{source} {name}: task pods may reach the metrics port {metrics_port}"
        );
        assert!(
            ingress_allows(objects, &pod, &prometheus, metrics_port),
            "{source} {name}: {prometheus_namespace} may not reach the metrics port"
        );
    }

    for monitor in objects.iter().filter(|o| o["kind"] == "ServiceMonitor") {
        let endpoints = monitor["spec"]["endpoints"].as_array().unwrap();
        assert_eq!(endpoints.len(), 1, "{source}");
        let selector = json!({"matchLabels": monitor["spec"]["selector"]["matchLabels"]});
        let services: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Service" && selects(&selector, &o["metadata"]["labels"]))
            .collect();
        assert_eq!(
            services.len(),
            1,
            "{source}: the ServiceMonitor selects one Service"
        );
        let port = services[0]["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == endpoints[0]["port"])
            .unwrap_or_else(|| {
                panic!("{source}: the Service has no port {}", endpoints[0]["port"])
            });
        assert_eq!(port["targetPort"], "metrics", "{source}");
        assert_eq!(endpoints[0]["path"], "/metrics", "{source}");
    }

    for ingress in objects.iter().filter(|o| o["kind"] == "Ingress") {
        let mut paths: Vec<(String, String)> = ingress["spec"]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rule| rule["http"]["paths"].as_array().unwrap().iter())
            .map(|path| {
                (
                    path["path"].as_str().unwrap().to_owned(),
                    path["pathType"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                ("/openapi.json".to_owned(), "Exact".to_owned()),
                ("/v1".to_owned(), "Prefix".to_owned()),
            ],
            "{source}: the Ingress routes more than the public API"
        );
        assert!(ingress["spec"]["defaultBackend"].is_null(), "{source}");
    }
}

#[test]
fn metrics_have_their_own_port_that_task_pods_and_the_ingress_never_reach() {
    testsupport::needs_env!(Program("kubectl"), Program("helm"));
    let defaults = Names::defaults();
    let renamed = Names::unique("deploy-metrics");
    let installations = [
        (
            "helm (default values)",
            helm_template(&defaults, None),
            "monitoring",
        ),
        (
            "helm -f values-prod.yaml, renamed",
            helm_template(&renamed, Some("values-prod.yaml")),
            "monitoring",
        ),
        (
            "helm, Prometheus elsewhere, another port",
            helm_template_set(
                &renamed,
                Some("values-prod.yaml"),
                &[
                    "networkPolicy.metricsNamespaces={prom}",
                    "monitoring.port=9100",
                ],
            ),
            "prom",
        ),
        (
            "manifests/overlays/dev",
            kustomize("dev", &defaults),
            "monitoring",
        ),
        (
            "helm -f values-staging.yaml, renamed",
            helm_template(&renamed, Some("values-staging.yaml")),
            "monitoring",
        ),
        (
            "manifests/overlays/staging, renamed",
            kustomize("staging", &renamed),
            "monitoring",
        ),
        (
            "manifests/overlays/prod, renamed",
            kustomize("prod", &renamed),
            "monitoring",
        ),
    ];
    for (source, rendered, prometheus) in &installations {
        assert_metrics_stay_inside(source, &objects(rendered), prometheus);
    }
    // The production renderings do have what the checks above look at.
    for (source, rendered, _) in [&installations[1], &installations[4]] {
        let objects = objects(rendered);
        for kind in ["Ingress", "ServiceMonitor"] {
            assert!(
                objects.iter().any(|o| o["kind"] == kind),
                "{source} has no {kind}"
            );
        }
    }
}
