//! Tenants' secrets on the cluster: a secret is a labelled Kubernetes Secret in the tasks
//! namespace, a task's reference reaches its Job as a `secretKeyRef`, and the value is in
//! neither the Job, the API's answers, nor any row of the PostgreSQL database.

use k8s_openapi::api::core::v1::Secret;

use super::*;
use crate::secrets::PLAIN;

const VALUE: &str = "s3cret-4b2e9d61-cluster";

impl Dispatcher {
    async fn send(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn a_secret_reference_reaches_the_job_as_a_secret_key_ref_and_its_value_nowhere_else() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-secrets", |setup| async move {
        let acme = setup.tenant("acme").await;
        let globex = setup.tenant("globex").await;
        let dispatcher = setup.start_keeping_jobs().await;
        let put = json!({"data": {"token": VALUE, "org": "org-1"}});
        let (status, created) = dispatcher.send(&acme, reqwest::Method::PUT, "/v1/secrets/openai", Some(&put)).await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["keys"], json!(["org", "token"]));

        // The Kubernetes Secret: in the tasks namespace, labelled with its tenant and name.
        let secrets = setup.ns.api::<Secret>();
        let object = secrets.get("ab-secret.acme.openai").await.unwrap();
        let labels = object.metadata.labels.clone().unwrap();
        assert_eq!(labels["agent-bus.io/tenant"], "acme");
        assert_eq!(labels["agent-bus.io/secret"], "openai");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "agent-bus");
        assert_eq!(object.type_.as_deref(), Some("Opaque"));
        assert_eq!(object.data.unwrap()["token"].0, VALUE.as_bytes());

        // Another tenant sees nothing of it.
        let (status, _) = dispatcher.send(&globex, reqwest::Method::GET, "/v1/secrets/openai", None).await;
        assert_eq!(status, 404);
        let (status, _) = dispatcher.send(&globex, reqwest::Method::DELETE, "/v1/secrets/openai", None).await;
        assert_eq!(status, 404);
        let (_, listed) = dispatcher.send(&globex, reqwest::Method::GET, "/v1/secrets", None).await;
        assert_eq!(listed, json!({"items": []}));
        let (_, listed) = dispatcher.send(&acme, reqwest::Method::GET, "/v1/secrets", None).await;
        assert_eq!(listed["items"][0]["name"], "openai", "{listed}");
        let body = json!({"name": "uses-secret", "image": "registry.invalid/x:1", "command": ["python", "call.py"],
            "env": {"OPENAI_API_KEY": {"secret": "openai", "key": "token"}, "MODE": PLAIN}});
        let (status, refused) = dispatcher.post(&globex, "/v1/tasks", &body, None).await;
        assert_eq!(status, 409, "{refused}");
        assert_eq!(refused["error"]["field"], "env.OPENAI_API_KEY");

        let (status, task) = dispatcher.post(&acme, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let done = dispatcher.wait_for_state(&acme, &id, &["succeeded", "failed"]).await;
        assert_eq!(done["state"], "succeeded", "{done}");

        let jobs = jobs_of(&setup.ns, &id).await;
        assert_eq!(jobs.len(), 1);
        let container = jobs[0].spec.clone().unwrap().template.spec.unwrap().containers[0].clone();
        let env = container.env.unwrap();
        let reference = env.iter().find(|e| e.name == "OPENAI_API_KEY").unwrap();
        assert_eq!(reference.value, None);
        let selector = reference.value_from.clone().unwrap().secret_key_ref.unwrap();
        assert_eq!(
            (selector.name.as_str(), selector.key.as_str(), selector.optional),
            ("ab-secret.acme.openai", "token", Some(false))
        );
        assert_eq!(env.iter().find(|e| e.name == "MODE").unwrap().value.as_deref(), Some(PLAIN));
        let job_text = serde_json::to_string(&jobs[0]).unwrap();
        assert!(!job_text.contains(VALUE), "the value is in the Job");

        let (_, events) = dispatcher.send(&acme, reqwest::Method::GET, &format!("/v1/tasks/{id}/events"), None).await;
        for answer in [&created, &task, &done, &events, &listed] {
            assert!(!answer.to_string().contains(VALUE), "the value in {answer}");
        }
        assert_eq!(done["env"]["OPENAI_API_KEY"], json!({"secret": "openai", "key": "token"}));
        crate::secrets::assert_nowhere_in_the_database(&setup.db.url, VALUE, PLAIN).await;

        // Deleted: the Secret goes, and new references to it are refused.
        let (status, _) = dispatcher.send(&acme, reqwest::Method::DELETE, "/v1/secrets/openai", None).await;
        assert_eq!(status, 204);
        assert!(secrets.get_opt("ab-secret.acme.openai").await.unwrap().is_none());
        let (status, refused) = dispatcher.post(&acme, "/v1/tasks", &body, None).await;
        assert_eq!(status, 409, "{refused}");
    })
    .await;
}

#[tokio::test]
async fn a_task_whose_secret_was_deleted_before_launch_fails_without_a_job() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    with_environment("e2e-secret-gone", |setup| async move {
        let acme = setup.tenant("acme").await;
        // Only the API: the task stays queued while its secret is deleted.
        let mut api = setup.start_with("api-only", &["--roles", "api"]).await;
        let put = json!({"data": {"token": VALUE}});
        let (status, _) = api.send(&acme, reqwest::Method::PUT, "/v1/secrets/openai", Some(&put)).await;
        assert_eq!(status, 201);
        let body = json!({"name": "too-late", "image": "registry.invalid/x:1", "command": ["true"], "max_retries": 2,
            "env": {"OPENAI_API_KEY": {"secret": "openai", "key": "token"}}});
        let (status, task) = api.post(&acme, "/v1/tasks", &body, None).await;
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let (status, _) = api.send(&acme, reqwest::Method::DELETE, "/v1/secrets/openai", None).await;
        assert_eq!(status, 204);
        api.kill();

        let dispatcher = setup.start().await;
        let failed = dispatcher.wait_for_state(&acme, &id, &["failed", "succeeded"]).await;
        assert_eq!(failed["state"], "failed", "{failed}");
        assert_eq!(failed["reason"], "launch_rejected", "{failed}");
        assert_eq!(
            failed["message"],
            "env.OPENAI_API_KEY: secret 'openai' does not exist (PUT /v1/secrets/openai first)"
        );
        assert_eq!(failed["attempt"], 1, "not retried: {failed}");
        assert!(jobs_of(&setup.ns, &id).await.is_empty(), "no Job was made");
    })
    .await;
}
