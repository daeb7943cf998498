//! The launcher scaled by KEDA (`launcher.autoscaling.mode=keda`): the chart's
//! ScaledObject (Prometheus and redis-streams triggers) and TriggerAuthentication pass a
//! server-side dry-run against KEDA's own CRDs (`tests/deploy/fixtures/keda/`), which
//! really check them: a ScaledObject with an unknown field or with fewer maximum than
//! minimum replicas is refused. In keda mode the chart renders no launcher HPA.

use serde_json::Value;

use crate::support::*;

/// Installs KEDA's ScaledObject and TriggerAuthentication CRDs (server-side apply, so a
/// second run changes nothing) and waits until the API server serves them.
fn ensure_keda_crds() {
    let dir = repo_root().join("tests/deploy/fixtures/keda");
    install_crds(
        &[
            dir.join("keda.sh_scaledobjects.yaml"),
            dir.join("keda.sh_triggerauthentications.yaml"),
        ],
        &["scaledobjects.keda.sh", "triggerauthentications.keda.sh"],
    );
}

/// The documents of `rendered` whose kind is one of `kinds`, joined again.
fn only_kinds(rendered: &str, kinds: &[&str]) -> String {
    yaml_docs(rendered)
        .into_iter()
        .filter(|doc| kinds.contains(&kind_of(doc)))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A server-side dry-run of `yaml` in the (existing) namespace; the server's answer.
fn dry_run(yaml: &str) -> Output {
    run_status(
        tool("kubectl"),
        &["apply", "--dry-run=server", "-o", "json", "-f", "-"],
        Some(yaml),
    )
}

fn launcher_scaling(rendered: &str, names: &Names) -> (Vec<Value>, Vec<Value>) {
    let objects = parsed(rendered);
    let hpas: Vec<Value> = objects
        .iter()
        .filter(|o| o["kind"] == "HorizontalPodAutoscaler")
        .cloned()
        .collect();
    let scaled: Vec<Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ScaledObject")
        .cloned()
        .collect();
    for object in &scaled {
        assert_eq!(object["metadata"]["namespace"], names.dispatcher.as_str());
    }
    (hpas, scaled)
}

#[test]
fn the_launchers_scaled_object_passes_kedas_schema_for_both_triggers() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_keda_crds();
    let names = Names::unique("deploy-keda");
    let prometheus = helm_template_set(&names, None, &["launcher.autoscaling.mode=keda"]);
    let in_cluster_redis = helm_template_set(
        &names,
        Some("values-dev.yaml"),
        &[
            "launcher.autoscaling.enabled=true",
            "launcher.autoscaling.mode=keda",
            "launcher.autoscaling.keda.trigger=redis-streams",
            "launcher.autoscaling.keda.redisStreams.passwordSecret.name=redis-auth",
            "launcher.autoscaling.keda.redisStreams.queues={default,batch}",
        ],
    );
    let external_redis = helm_template_set(
        &names,
        None,
        &[
            "launcher.autoscaling.mode=keda",
            "launcher.autoscaling.keda.trigger=redis-streams",
            "launcher.autoscaling.keda.redisStreams.address=redis.example.internal:6380",
            "launcher.autoscaling.keda.redisStreams.enableTLS=true",
            "launcher.autoscaling.keda.redisStreams.keyPrefix=ab:",
        ],
    );

    // The default is the CPU HPA, for both roles; keda mode leaves the api's alone.
    let (hpas, scaled) = launcher_scaling(&helm_template(&names, None), &names);
    assert_eq!(hpas.len(), 2);
    assert!(scaled.is_empty());
    for rendered in [&prometheus, &in_cluster_redis, &external_redis] {
        let (hpas, scaled) = launcher_scaling(rendered, &names);
        let targets: Vec<&Value> = hpas
            .iter()
            .map(|h| &h["spec"]["scaleTargetRef"]["name"])
            .collect();
        assert!(
            !targets.contains(&&Value::from("agent-bus-launcher")),
            "{targets:?}"
        );
        assert_eq!(scaled.len(), 1);
        assert_eq!(
            scaled[0]["spec"]["scaleTargetRef"],
            serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "agent-bus-launcher"})
        );
        // The target is a Deployment of the same rendering.
        assert!(parsed(rendered).iter().any(|o| o["kind"] == "Deployment"
            && o["metadata"]["name"] == "agent-bus-launcher"));
    }

    // Prometheus: the queued-tasks gauge, selected as the alert rules select it.
    let (_, scaled) = launcher_scaling(&prometheus, &names);
    let trigger = &scaled[0]["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "prometheus");
    assert_eq!(
        trigger["metadata"]["query"],
        "sum(max by (queue) (agent_bus_queue_depth{job=\"agent-bus\"}))"
    );
    assert_eq!(trigger["metadata"]["threshold"], "20");
    let selected = helm_template_set(
        &names,
        None,
        &[
            "launcher.autoscaling.mode=keda",
            "monitoring.job=dispatchers",
        ],
    );
    let (_, scaled) = launcher_scaling(&selected, &names);
    assert_eq!(
        scaled[0]["spec"]["triggers"][0]["metadata"]["query"],
        "sum(max by (queue) (agent_bus_queue_depth{job=\"dispatchers\"}))"
    );

    // redis-streams: one trigger per queue and band, on the launchers' consumer group.
    let (_, scaled) = launcher_scaling(&in_cluster_redis, &names);
    let streams: Vec<(&Value, &Value, &Value)> = scaled[0]["spec"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["type"], "redis-streams");
            assert_eq!(t["metadata"]["consumerGroup"], "launchers");
            assert_eq!(t["authenticationRef"]["name"], "agent-bus-launcher-redis");
            (
                &t["metadata"]["stream"],
                &t["metadata"]["address"],
                &t["metadata"]["lagCount"],
            )
        })
        .collect();
    let address = format!("agent-bus-redis.{}.svc:6379", names.dispatcher);
    let expected: Vec<String> = ["default", "batch"]
        .iter()
        .flat_map(|q| ["high", "normal", "low"].map(|b| format!("agent-bus:q:{q}:{b}")))
        .collect();
    assert_eq!(
        streams
            .iter()
            .map(|s| s.0.as_str().unwrap())
            .collect::<Vec<_>>(),
        expected
    );
    assert!(
        streams
            .iter()
            .all(|s| s.1 == address.as_str() && s.2 == "20")
    );
    let auth = parsed(&in_cluster_redis)
        .into_iter()
        .find(|o| o["kind"] == "TriggerAuthentication")
        .unwrap();
    assert_eq!(
        auth["spec"]["secretTargetRef"],
        serde_json::json!([{"parameter": "password", "name": "redis-auth", "key": "redis-password"}])
    );
    let (_, scaled) = launcher_scaling(&external_redis, &names);
    let first = &scaled[0]["spec"]["triggers"][0];
    assert_eq!(first["metadata"]["address"], "redis.example.internal:6380");
    assert_eq!(first["metadata"]["stream"], "ab:q:default:high");
    assert_eq!(first["metadata"]["enableTLS"], "true");
    assert!(first["authenticationRef"].is_null());
    assert!(!external_redis.contains("kind: TriggerAuthentication"));

    // Without the in-cluster Redis, redis-streams needs an address.
    let refused = helm_template_refused(&[
        "launcher.autoscaling.mode=keda",
        "launcher.autoscaling.keda.trigger=redis-streams",
    ]);
    assert!(
        refused.contains("launcher.autoscaling.keda.redisStreams.address"),
        "{refused}"
    );

    // The API server checks them against KEDA's schema.
    kubectl(&["create", "namespace", &names.dispatcher], None);
    kubectl(
        &[
            "label",
            "namespace",
            &names.dispatcher,
            "agent-bus.io/test=true",
        ],
        None,
    );
    let outcome = std::panic::catch_unwind(|| {
        for rendered in [&prometheus, &in_cluster_redis, &external_redis] {
            let keda = only_kinds(rendered, &["ScaledObject", "TriggerAuthentication"]);
            let out = dry_run(&keda);
            assert!(out.success, "{keda}\n{}", out.stderr);
            assert!(!out.stderr.contains("Warning"), "{}", out.stderr);
        }
        let valid = only_kinds(&prometheus, &["ScaledObject"]);
        let unknown_field = valid.replace("  pollingInterval:", "  pollingIntervall:");
        assert_ne!(unknown_field, valid);
        let out = dry_run(&unknown_field);
        assert!(!out.success, "an unknown field was accepted");
        assert!(out.stderr.contains("pollingIntervall"), "{}", out.stderr);
        let inverted = valid.replace("maxReplicaCount: 20", "maxReplicaCount: 1");
        assert_ne!(inverted, valid);
        let out = dry_run(&inverted);
        assert!(
            !out.success,
            "maxReplicaCount < minReplicaCount was accepted"
        );
        assert!(
            out.stderr
                .contains("minReplicaCount must be less than or equal to maxReplicaCount"),
            "{}",
            out.stderr
        );
    });
    delete_namespaces(&names);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
