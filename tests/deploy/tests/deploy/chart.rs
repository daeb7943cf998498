//! The Helm chart: lint, schema, documented values, server-side dry-run, `helm install`.

use crate::rbac::assert_rbac;
use crate::support::*;
use testsupport::{CLUSTER_TIMEOUT, poll_until};

// --- the chart --------------------------------------------------------------------------------

#[test]
fn the_chart_lints_with_each_values_file_and_refuses_unknown_keys() {
    testsupport::needs_env!(Program("helm"));
    let chart = repo_root().join("helm/agent-bus");
    let chart = chart.to_str().unwrap();
    for values in [
        None,
        Some("values-dev.yaml"),
        Some("values-staging.yaml"),
        Some("values-prod.yaml"),
    ] {
        let mut args = vec!["lint", "--strict", chart];
        let path;
        if let Some(values) = values {
            path = format!("{chart}/{values}");
            args.extend(["-f", &path]);
        }
        let out = helm(&args);
        assert!(
            out.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{}",
            out.stdout
        );
    }
    // values.schema.json: a misspelt key is an error, at the top and deep down.
    for bad in [
        "replicaz=3",
        "api.replicaz=3",
        "tasks.limitRange.maxx.cpu=1",
        "probes.liveness.periodSecond=1",
    ] {
        let out = run_status(tool("helm"), &["lint", chart, "--set", bad], None);
        assert!(!out.success, "helm lint accepted --set {bad}");
        let said = format!("{}{}", out.stdout, out.stderr);
        assert!(
            said.contains("additional properties"),
            "--set {bad}: {said}"
        );
    }
    // Contradicting secret sources are refused with a message that says what to do.
    let refused = helm_template_refused(&["externalSecret.enabled=true"]);
    assert!(
        refused.contains("choose exactly one of secrets.create"),
        "{refused}"
    );
}

#[test]
fn a_private_datastore_ca_is_mounted_into_every_role_and_names_the_redis_ca_file() {
    testsupport::needs_env!(Program("helm"));
    let names = Names::defaults();
    let rendered = objects(&helm_template_set(
        &names,
        None,
        &[
            "datastoreTls.caConfigMap=datastore-ca",
            "datastoreTls.redisCaKey=redis-ca.pem",
        ],
    ));
    for deployment in dispatcher_deployments(&rendered) {
        let name = &deployment["metadata"]["name"];
        let container = dispatcher_container(deployment).unwrap();
        assert_eq!(
            env_value(container, "AGENT_BUS_REDIS_CA_FILE"),
            "/etc/agent-bus-ca/redis-ca.pem",
            "{name}"
        );
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "datastore-ca")
            .unwrap_or_else(|| panic!("{name}: no datastore-ca mount"));
        assert_eq!(mount["mountPath"], "/etc/agent-bus-ca");
        assert_eq!(mount["readOnly"], true);
        let volume = deployment["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "datastore-ca")
            .unwrap();
        assert_eq!(volume["configMap"]["name"], "datastore-ca", "{name}");
    }
    // Without the values nothing is mounted and no CA file is named.
    for deployment in dispatcher_deployments(&objects(&helm_template(&names, None))) {
        let container = dispatcher_container(deployment).unwrap();
        let env = container["env"].to_string();
        assert!(!env.contains("AGENT_BUS_REDIS_CA_FILE"), "{env}");
    }
    // Contradicting or incomplete settings are refused, naming the values.
    let chart = repo_root().join("helm/agent-bus");
    for (sets, says) in [
        (
            &["datastoreTls.caConfigMap=a", "datastoreTls.caSecret=b"][..],
            "set caSecret or caConfigMap, not both",
        ),
        (
            &["datastoreTls.redisCaKey=redis-ca.pem"][..],
            "datastoreTls.redisCaKey needs",
        ),
    ] {
        let mut args = vec![
            "template",
            "x",
            chart.to_str().unwrap(),
            "--kube-version",
            "v1.34.4",
        ];
        for set in sets {
            args.extend(["--set", set]);
        }
        let out = run_status(tool("helm"), &args, None);
        assert!(!out.success, "{sets:?}");
        assert!(out.stderr.contains(says), "{sets:?}: {}", out.stderr);
    }
}

/// The dotted paths of the keys that values.yaml documents (a `# --` comment above them).
fn documented_values(text: &str) -> Vec<String> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut documented = false;
    let mut block: Option<usize> = None;
    let mut paths = Vec::new();
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some(block_indent) = block {
            if trimmed.is_empty() || indent > block_indent {
                continue;
            }
            block = None;
        }
        if trimmed.starts_with("# --") {
            documented = true;
            continue;
        }
        if trimmed.starts_with('#') || trimmed.starts_with('-') || trimmed.is_empty() {
            continue;
        }
        let Some((key, rest)) = trimmed.split_once(':') else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_owned()));
        if rest.trim().starts_with('|') || rest.trim().starts_with('>') {
            block = Some(indent);
        }
        if documented {
            paths.push(
                stack
                    .iter()
                    .map(|(_, k)| k.as_str())
                    .collect::<Vec<_>>()
                    .join("."),
            );
            documented = false;
        }
    }
    paths
}

#[test]
fn every_value_is_documented_in_the_chart_readme() {
    let chart = repo_root().join("helm/agent-bus");
    let values = std::fs::read_to_string(chart.join("values.yaml")).unwrap();
    let readme = std::fs::read_to_string(chart.join("README.md")).unwrap();
    let documented = documented_values(&values);
    assert!(documented.len() > 100, "{documented:?}");
    let missing: Vec<&String> = documented
        .iter()
        .filter(|path| !readme.contains(&format!("| `{path}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "values missing from the README's table: {missing:?}"
    );
}

#[test]
fn the_chart_passes_a_server_side_dry_run_with_each_values_file() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_crds();
    for values in [
        None,
        Some("values-dev.yaml"),
        Some("values-staging.yaml"),
        Some("values-prod.yaml"),
    ] {
        let names = Names::unique("deploy-chart-dry");
        let rendered = helm_template(&names, values);
        let outcome = std::panic::catch_unwind(|| server_side_dry_run(&rendered, &names));
        delete_namespaces(&names);
        let items = outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let kinds: Vec<&str> = items.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        for kind in [
            "Deployment",
            "Role",
            "RoleBinding",
            "ServiceAccount",
            "Service",
            "ConfigMap",
            "NetworkPolicy",
            "ResourceQuota",
            "LimitRange",
            "Pod",
        ] {
            assert!(kinds.contains(&kind), "{values:?}: no {kind} in {kinds:?}");
        }
        if matches!(values, Some("values-prod.yaml" | "values-staging.yaml")) {
            for kind in [
                "ExternalSecret",
                "ServiceMonitor",
                "PrometheusRule",
                "Ingress",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "PersistentVolumeClaim",
            ] {
                assert!(kinds.contains(&kind), "{values:?}: no {kind} in {kinds:?}");
            }
            assert!(
                !kinds.contains(&"Secret"),
                "{values:?} takes its Secret from the ExternalSecret"
            );
        }
    }
}

#[tokio::test]
async fn helm_install_with_the_dev_values_creates_every_object() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    let names = Names::unique("deploy-helm");
    let uninstall = {
        let names = names.clone();
        move || {
            let _ = run_status(
                tool("helm"),
                &[
                    "uninstall",
                    "agent-bus",
                    "--namespace",
                    &names.dispatcher,
                    "--wait",
                    "--timeout",
                    "60s",
                ],
                None,
            );
        }
    };
    with_installation(&names, uninstall, || async {
        // The release namespace is restricted too: the dispatcher's pods must be admitted.
        create_namespaces(
            "",
            &Names {
                dispatcher: names.dispatcher.clone(),
                tasks: names.dispatcher.clone(),
            },
        );
        let chart = repo_root().join("helm/agent-bus");
        let values = chart.join("values-dev.yaml");
        let tasks = format!("tasks.namespace={}", names.tasks);
        let started = std::time::Instant::now();
        let install = helm(&[
            "install",
            "agent-bus",
            chart.to_str().unwrap(),
            "-f",
            values.to_str().unwrap(),
            "--namespace",
            &names.dispatcher,
            "--set",
            &tasks,
        ]);
        eprintln!("helm install took {:?}", started.elapsed());
        assert!(
            install.stdout.contains("STATUS: deployed"),
            "{}",
            install.stdout
        );
        assert!(
            install
                .stdout
                .contains(&format!("Task Jobs run in namespace {}", names.tasks)),
            "NOTES: {}",
            install.stdout
        );

        // Every object of the release exists.
        let manifest = helm(&[
            "get",
            "manifest",
            "agent-bus",
            "--namespace",
            &names.dispatcher,
        ])
        .stdout;
        let expected = yaml_docs(&manifest).len();
        let found = kubectl(&["get", "-f", "-", "-o", "name"], Some(&manifest)).stdout;
        let found: Vec<&str> = found.lines().collect();
        assert_eq!(found.len(), expected, "{found:#?}");
        for object in [
            "namespace/",
            "serviceaccount/agent-bus",
            "role.rbac.authorization.k8s.io/agent-bus-dispatcher",
            "role.rbac.authorization.k8s.io/agent-bus-leader-election",
            "rolebinding.rbac.authorization.k8s.io/agent-bus-dispatcher",
            "configmap/agent-bus-config",
            "secret/agent-bus",
            "service/agent-bus-api",
            "deployment.apps/agent-bus-api",
            "deployment.apps/agent-bus-launcher",
            "deployment.apps/agent-bus-watcher",
            "statefulset.apps/agent-bus-postgres",
            "deployment.apps/agent-bus-redis",
            "networkpolicy.networking.k8s.io/agent-bus-dispatcher",
            "networkpolicy.networking.k8s.io/agent-bus-default-deny",
            "resourcequota/agent-bus-tasks",
            "limitrange/agent-bus-tasks",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(object)),
                "{object} missing from {found:#?}"
            );
        }
        // Their pods are admitted in the restricted namespace and (kwok plays the kubelet)
        // become ready.
        for workload in [
            "deployment/agent-bus-api",
            "deployment/agent-bus-launcher",
            "deployment/agent-bus-watcher",
            "deployment/agent-bus-redis",
            "statefulset/agent-bus-postgres",
        ] {
            poll_until(&format!("{workload} ready"), CLUSTER_TIMEOUT, || async {
                let out = run_status(
                    tool("kubectl"),
                    &[
                        "get",
                        workload,
                        "-n",
                        &names.dispatcher,
                        "-o",
                        "jsonpath={.status.readyReplicas}/{.spec.replicas}",
                    ],
                    None,
                );
                if out.success && out.stdout == "1/1" {
                    Ok(())
                } else {
                    Err(format!("{} {}", out.stdout, out.stderr))
                }
            })
            .await;
        }
        assert_rbac(&names);
    })
    .await;
}

/// Webhook delivery settings reach every role as the dispatcher's variables, and a
/// receivers' CA ConfigMap is mounted where `AGENT_BUS_WEBHOOK_CA_FILE` points; without
/// values, no variable is set (the dispatcher's defaults hold).
#[test]
fn webhook_settings_and_the_receivers_ca_reach_every_role() {
    testsupport::needs_env!(Program("helm"));
    let names = Names::defaults();
    let rendered = objects(&helm_template_set(
        &names,
        None,
        &[
            "webhooks.allowedHosts={hooks.internal.svc,example.com}",
            "webhooks.timeout=5s",
            "webhooks.retryFor=2h",
            "webhooks.backoff=2s",
            "webhooks.caConfigMap=hooks-ca",
        ],
    ));
    for deployment in dispatcher_deployments(&rendered) {
        let name = &deployment["metadata"]["name"];
        let container = dispatcher_container(deployment).unwrap();
        for (variable, value) in [
            (
                "AGENT_BUS_WEBHOOK_ALLOWED_HOSTS",
                "hooks.internal.svc,example.com",
            ),
            ("AGENT_BUS_WEBHOOK_TIMEOUT", "5s"),
            ("AGENT_BUS_WEBHOOK_RETRY_FOR", "2h"),
            ("AGENT_BUS_WEBHOOK_BACKOFF", "2s"),
            (
                "AGENT_BUS_WEBHOOK_CA_FILE",
                "/etc/agent-bus-webhook-ca/ca.crt",
            ),
        ] {
            assert_eq!(env_value(container, variable), value, "{name}");
        }
        assert!(
            container["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| {
                    m["name"] == "webhook-ca" && m["mountPath"] == "/etc/agent-bus-webhook-ca"
                }),
            "{name}"
        );
        let volumes = deployment["spec"]["template"]["spec"]["volumes"].to_string();
        assert!(volumes.contains("hooks-ca"), "{name}: {volumes}");
    }
    // The variables the chart sets are the dispatcher's own.
    let help = run(dispatcher_binary(), &["serve", "--help"], None).stdout;
    for variable in [
        "AGENT_BUS_WEBHOOK_ALLOWED_HOSTS",
        "AGENT_BUS_WEBHOOK_TIMEOUT",
        "AGENT_BUS_WEBHOOK_RETRY_FOR",
        "AGENT_BUS_WEBHOOK_BACKOFF",
        "AGENT_BUS_WEBHOOK_CA_FILE",
    ] {
        assert!(help.contains(variable), "{variable}");
    }
    for deployment in dispatcher_deployments(&objects(&helm_template(&names, None))) {
        let env = dispatcher_container(deployment).unwrap()["env"].to_string();
        assert!(!env.contains("AGENT_BUS_WEBHOOK"), "{env}");
    }
}

#[test]
fn the_dispatchers_limits_reach_every_role_as_its_own_variables() {
    testsupport::needs_env!(Program("helm"));
    let names = Names::defaults();
    let expected = [
        ("AGENT_BUS_QUEUES", "gpu,batch"),
        ("AGENT_BUS_TASK_RETENTION", "768h"),
        ("AGENT_BUS_MAX_IN_FLIGHT_REQUESTS", "64"),
        ("AGENT_BUS_MAX_STREAMS_PER_TENANT", "8"),
        ("AGENT_BUS_KUBE_API_QPS", "20"),
        ("AGENT_BUS_KUBE_API_BURST", "30"),
    ];
    let rendered = objects(&helm_template_set(
        &names,
        None,
        &[
            "config.queues={gpu,batch}",
            "config.taskRetentionHours=768",
            "config.maxInFlightRequests=64",
            "config.maxStreamsPerTenant=8",
            "config.kubeApiQps=20",
            "config.kubeApiBurst=30",
        ],
    ));
    for deployment in dispatcher_deployments(&rendered) {
        let container = dispatcher_container(deployment).unwrap();
        for (variable, value) in expected {
            assert_eq!(env_value(container, variable), value, "{variable}");
        }
    }
    // Without declared queues the variable is absent: any queue.
    for deployment in dispatcher_deployments(&objects(&helm_template(&names, None))) {
        let env = dispatcher_container(deployment).unwrap()["env"].to_string();
        assert!(!env.contains("AGENT_BUS_QUEUES"), "{env}");
    }
    // The variables are the dispatcher's own, and the defaults its defaults.
    let help = run(dispatcher_binary(), &["serve", "--help"], None).stdout;
    for (variable, _) in expected {
        assert!(help.contains(variable), "{variable}");
    }
    for default in [
        "[default: 2160h]",
        "[default: 256]",
        "[default: 32]",
        "[default: 200]",
        "[default: 400]",
    ] {
        assert!(help.contains(default), "{default}");
    }
}
