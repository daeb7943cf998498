//! What a tenant sends that reaches the cluster: only labels and annotations under the
//! operator's prefixes, no reserved environment variable and no resource request past
//! the per-task maxima ever becomes part of a Job.

use super::*;

#[tokio::test]
async fn only_allowed_labels_and_annotations_reach_a_job() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-keys", |setup| async move {
        let key = setup.tenant("acme").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let base =
            json!({"name": "probe", "image": "registry.invalid/probe:1", "command": ["true"]});
        let with = |field: &str, value: Value| {
            let mut body = base.clone();
            body[field] = value;
            body
        };
        let refused = [
            (
                with("annotations", json!({"sidecar.istio.io/inject": "true"})),
                "annotations.sidecar.istio.io/inject",
            ),
            (
                with(
                    "annotations",
                    json!({"vault.hashicorp.com/agent-inject": "true"}),
                ),
                "annotations.vault.hashicorp.com/agent-inject",
            ),
            (
                with(
                    "annotations",
                    json!({"k8s.v1.cni.cncf.io/networks": "macvlan"}),
                ),
                "annotations.k8s.v1.cni.cncf.io/networks",
            ),
            (
                with(
                    "annotations",
                    json!({"io.kubernetes.cri-o.Devices": "/dev/nvidia0"}),
                ),
                "annotations.io.kubernetes.cri-o.Devices",
            ),
            (
                with("labels", json!({"kueue.x-k8s.io/priority-class": "urgent"})),
                "labels.kueue.x-k8s.io/priority-class",
            ),
            (with("labels", json!({"app": "database"})), "labels.app"),
            (
                with("labels", json!({"agent-bus.io/tenant": "globex"})),
                "labels.agent-bus.io/tenant",
            ),
            (
                with("env", json!({"NVIDIA_VISIBLE_DEVICES": "all"})),
                "env.NVIDIA_VISIBLE_DEVICES",
            ),
            (
                with("env", json!({"LD_PRELOAD": "/tmp/x.so"})),
                "env.LD_PRELOAD",
            ),
            (with("resources", json!({"cpu": "100000"})), "resources.cpu"),
            (
                with("resources", json!({"memory": "100Ti"})),
                "resources.memory",
            ),
        ];
        for (body, field) in refused {
            let (status, error) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
            assert_eq!(status, 422, "{body}: {error}");
            assert_eq!(error["error"]["field"], field, "{error}");
        }

        let body = json!({"name": "probe", "image": "registry.invalid/probe:1", "command": ["true"],
            "labels": {"example.com/team": "vision"},
            "annotations": {"example.com/owner": "ml", "agent-bus.io/test-run-seconds": "1"}});
        let (status, task) = dispatcher.post(&key, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let done = dispatcher
            .wait_for_state(&key, &id, &["succeeded", "failed"])
            .await;
        assert_eq!(done["state"], "succeeded", "{done}");

        // The namespace holds exactly this task's Job: no refused body was launched.
        let all = setup
            .ns
            .api::<Job>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        assert_eq!(
            all.len(),
            1,
            "{:?}",
            all.iter()
                .map(|j| j.metadata.name.clone())
                .collect::<Vec<_>>()
        );
        let template = all[0].spec.clone().unwrap().template;
        let meta = template.metadata.unwrap();
        let labels = meta.labels.unwrap();
        let annotations = meta.annotations.unwrap();
        assert_eq!(labels["example.com/team"], "vision");
        assert_eq!(labels["agent-bus.io/tenant"], "acme");
        assert_eq!(annotations["example.com/owner"], "ml");
        // Besides ours and the tenant's, only what the Job controller adds itself.
        let foreign: Vec<&String> = labels
            .keys()
            .chain(annotations.keys())
            .filter(|k| {
                !(k.starts_with("example.com/")
                    || k.starts_with("agent-bus.io/")
                    || k.starts_with("app.kubernetes.io/")
                    || k.starts_with("batch.kubernetes.io/")
                    || ["controller-uid", "job-name"].contains(&k.as_str()))
            })
            .collect();
        assert!(foreign.is_empty(), "{foreign:?}");
        let env = template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap_or_default();
        assert!(
            env.iter()
                .all(|e| !(e.name.starts_with("NVIDIA_") || e.name.starts_with("LD_"))),
            "{env:?}"
        );
    })
    .await;
}
