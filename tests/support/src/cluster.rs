//! The test cluster: a client from the environment's kubeconfig and one throwaway
//! namespace per test, with a report of its pods and events when the test fails.

use std::fmt::Write as _;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::{CLUSTER_TIMEOUT, EnvError, env_var, poll_until, unique_suffix};

/// A client for the test cluster, from the kubeconfig in `KUBECONFIG`.
pub async fn kube_client() -> Result<Client, EnvError> {
    let path = env_var("KUBECONFIG")?;
    let kube_err = |source: Box<dyn std::error::Error + Send + Sync>| EnvError::Kube {
        kubeconfig: path.clone(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(&path).map_err(|e| kube_err(Box::new(e)))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| kube_err(Box::new(e)))?;
    Client::try_from(config).map_err(|e| kube_err(Box::new(e)))
}

/// A namespace that exists for one test. Cheap to clone; deleting it is the job of
/// [`with_namespace`].
#[derive(Clone)]
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` labelled `agent-bus.io/test=true`, and waits until its
    /// `default` service account exists (pods cannot be created before that).
    pub async fn create(client: Client, prefix: &str) -> Self {
        let prefix: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let name = format!("{}-{}", prefix.trim_matches('-'), unique_suffix());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("agent-bus.io/test".to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        poll_until("the default service account", CLUSTER_TIMEOUT, || async {
            match accounts.get_opt("default").await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("not created yet".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        Self { client, name }
    }

    /// An `Api` for a namespaced resource in this namespace.
    #[must_use]
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace (the namespace controller removes what is in it).
    pub async fn delete(&self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        if let Err(e) = namespaces
            .delete(&self.name, &DeleteParams::background())
            .await
        {
            eprintln!("warning: deleting test namespace {}: {e}", self.name);
        }
    }

    /// What the namespace's pods are doing and what happened in it, for failure output.
    pub async fn report(&self) -> String {
        let mut out = format!("--- namespace {} ---\n", self.name);
        match self.api::<Pod>().list(&ListParams::default()).await {
            Ok(pods) if pods.items.is_empty() => out.push_str("no pods\n"),
            Ok(pods) => pods
                .items
                .iter()
                .for_each(|pod| out.push_str(&pod_report(pod))),
            Err(e) => {
                let _ = writeln!(out, "listing pods failed: {e}");
            }
        }
        out.push_str("events:\n");
        match self.api::<Event>().list(&ListParams::default()).await {
            Ok(events) => {
                let mut events = events.items;
                // Events written through events.k8s.io carry only `eventTime`.
                events.sort_by_key(|e| {
                    e.last_timestamp
                        .as_ref()
                        .map(|t| t.0)
                        .or_else(|| e.event_time.as_ref().map(|t| t.0))
                });
                for event in events {
                    let object = &event.involved_object;
                    let _ = writeln!(
                        out,
                        "  {} {} {}/{}: {}",
                        event.type_.as_deref().unwrap_or("?"),
                        event.reason.as_deref().unwrap_or("?"),
                        object.kind.as_deref().unwrap_or("?"),
                        object.name.as_deref().unwrap_or("?"),
                        event.message.as_deref().unwrap_or("").trim(),
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(out, "  listing events failed: {e}");
            }
        }
        out
    }
}

/// One line per pod and per condition and container: phase, node, conditions with
/// reasons, container states with exit codes.
#[must_use]
pub fn pod_report(pod: &Pod) -> String {
    let mut out = String::new();
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let status = pod.status.clone().unwrap_or_default();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("<unbound>");
    let _ = writeln!(
        out,
        "pod {name}: phase={} node={node}",
        status.phase.as_deref().unwrap_or("?")
    );
    for condition in status.conditions.unwrap_or_default() {
        let _ = writeln!(
            out,
            "  condition {}={} reason={} message={}",
            condition.type_,
            condition.status,
            condition.reason.unwrap_or_default(),
            condition.message.unwrap_or_default()
        );
    }
    for container in status.container_statuses.unwrap_or_default() {
        let state = container.state.unwrap_or_default();
        let detail = if let Some(t) = state.terminated {
            format!(
                "terminated exit_code={} reason={}",
                t.exit_code,
                t.reason.unwrap_or_default()
            )
        } else if let Some(w) = state.waiting {
            format!("waiting reason={}", w.reason.unwrap_or_default())
        } else if state.running.is_some() {
            "running".to_owned()
        } else {
            "unknown".to_owned()
        };
        let _ = writeln!(out, "  container {}: {detail}", container.name);
    }
    out
}

/// Runs `body` in a fresh namespace named after `prefix`. Whatever the outcome the
/// namespace is deleted; if `body` panics (a failed assertion), the namespace's pods and
/// events are printed first and the panic goes on.
pub async fn with_namespace<F, Fut, T>(prefix: &str, body: F) -> T
where
    F: FnOnce(TestNamespace) -> Fut,
    Fut: Future<Output = T>,
{
    let client = kube_client().await.unwrap_or_else(|e| panic!("{e}"));
    let namespace = TestNamespace::create(client, prefix).await;
    let outcome = AssertUnwindSafe(body(namespace.clone()))
        .catch_unwind()
        .await;
    if outcome.is_err() {
        eprintln!("{}", namespace.report().await);
    }
    namespace.delete().await;
    match outcome {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
