//! Database connections: each role's pool reaches its pods, and at the most replicas the
//! chart can reach, every pool together fits in what the PostgreSQL server accepts; a
//! chart that would not fit refuses to render, saying why.

use crate::support::*;

/// The connections the rendered Deployments and HPAs can hold at their most replicas.
fn connections_at_most(objects: &[serde_json::Value]) -> u64 {
    let mut total = 0;
    for deployment in dispatcher_deployments(objects) {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let container = dispatcher_container(deployment).unwrap();
        let pool: u64 = env_value(container, "AGENT_BUS_DATABASE_MAX_CONNECTIONS")
            .parse()
            .unwrap();
        let most = objects
            .iter()
            .find(|o| {
                ["HorizontalPodAutoscaler", "ScaledObject"]
                    .contains(&o["kind"].as_str().unwrap_or(""))
                    && o["spec"]["scaleTargetRef"]["name"] == name
            })
            .map_or_else(
                || deployment["spec"]["replicas"].as_u64().unwrap(),
                |scaler| {
                    scaler["spec"]["maxReplicas"]
                        .as_u64()
                        .or_else(|| scaler["spec"]["maxReplicaCount"].as_u64())
                        .unwrap()
                },
            );
        total += most * pool;
    }
    total
}

#[test]
fn the_roles_pools_fit_the_servers_connections_at_the_most_replicas() {
    testsupport::needs_env!(Program("helm"));
    let names = Names::defaults();
    for values in [
        None,
        Some("values-dev.yaml"),
        Some("values-staging.yaml"),
        Some("values-prod.yaml"),
    ] {
        let rendered = objects(&helm_template(&names, values));
        let total = connections_at_most(&rendered);
        assert!(total > 0 && total <= 200, "{values:?}: {total} connections");
    }
    let rendered = objects(&helm_template(&names, None));
    assert_eq!(connections_at_most(&rendered), 10 * 8 + 20 * 4 + 2 * 4);

    // Larger pools that would not fit are refused before anything is applied.
    let refused = helm_template_refused(&["launcher.databaseMaxConnections=16"]);
    assert!(
        refused.contains("pools hold 408 connections")
            && refused.contains("database.serverMaxConnections (200)"),
        "{refused}"
    );
    // …and accepted once the server takes them.
    let rendered = objects(&helm_template_set(
        &names,
        None,
        &[
            "launcher.databaseMaxConnections=16",
            "database.serverMaxConnections=500",
            "postgresql.enabled=true",
        ],
    ));
    assert_eq!(connections_at_most(&rendered), 408);
    let postgres = rendered
        .iter()
        .find(|o| o["kind"] == "StatefulSet")
        .unwrap();
    let args = postgres["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("max_connections=510"), "{args}");

    // The variable the chart sets is the dispatcher's own.
    let help = run(dispatcher_binary(), &["serve", "--help"], None).stdout;
    assert!(help.contains("AGENT_BUS_DATABASE_MAX_CONNECTIONS"));
}
