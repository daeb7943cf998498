//! The Kubernetes Job for one attempt of a task: a pure, deterministic function of the
//! task and the launch configuration, snapshot-tested.
//!
//! Invariants:
//! - the Job's name depends only on the task id and attempt, so a second create of the
//!   same attempt collides (409) instead of making a second Job;
//! - the pod always meets the Pod Security Standard `restricted` profile, whatever the
//!   task asks for; tenants cannot set host paths, privileges, service accounts or the
//!   namespace;
//! - maps are ordered (`BTreeMap`), so the same input gives byte-identical output.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;

use crate::placement::GpuClasses;
use crate::task::{Task, TaskId};

/// Labels every Job and pod of ours carries.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "agent-bus";
pub const LABEL_TASK_ID: &str = "agent-bus.io/task-id";
pub const LABEL_TENANT: &str = "agent-bus.io/tenant";
pub const LABEL_QUEUE: &str = "agent-bus.io/queue";
pub const LABEL_ATTEMPT: &str = "agent-bus.io/attempt";
pub const LABEL_KUEUE_QUEUE: &str = "kueue.x-k8s.io/queue-name";
/// The name of the container that runs the task's command.
pub const TASK_CONTAINER: &str = "task";

/// What the launcher needs besides the task to build its Job.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchConfig {
    pub namespace: String,
    pub gpu_classes: GpuClasses,
    /// Kubernetes deletes a finished Job this long after it finished: a backstop only,
    /// long enough for the watcher to have recorded the outcome.
    pub ttl_seconds_after_finished: i32,
    /// The user and group the task runs as (the `restricted` profile forbids root).
    pub run_as_user: i64,
    /// When set, Jobs carry `kueue.x-k8s.io/queue-name` so a cluster's Kueue admits them.
    pub kueue_queue_name: Option<String>,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        Self {
            namespace: "agent-bus-tasks".into(),
            gpu_classes: GpuClasses::default(),
            ttl_seconds_after_finished: 24 * 3600,
            run_as_user: 65532,
            kueue_queue_name: None,
        }
    }
}

/// Why no Job could be built. Submission validation makes these unreachable for stored
/// tasks; they guard against a configuration that changed under a queued task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("task {task_id}: GPU class '{class}' is not configured")]
    UnknownGpuClass { task_id: TaskId, class: String },
    #[error("task {task_id}: timeout of {timeout_seconds}s does not fit a Job deadline")]
    Timeout {
        task_id: TaskId,
        timeout_seconds: u32,
    },
}

/// The Job name of `attempt` of task `id`: `ab-<32 hex>-<attempt>`, an RFC 1123 label of
/// at most 46 characters, so pod names derived from it stay within 63.
#[must_use]
pub fn job_name(id: &TaskId, attempt: u32) -> String {
    format!("ab-{}-{attempt}", id.simple())
}

/// The labels that identify the Jobs and pods of one attempt.
#[must_use]
pub fn identity_labels(task: &Task) -> BTreeMap<String, String> {
    [
        (LABEL_MANAGED_BY, MANAGED_BY.to_owned()),
        (LABEL_TASK_ID, task.id.simple()),
        (LABEL_TENANT, task.tenant.clone()),
        (LABEL_QUEUE, task.spec.queue.clone()),
        (LABEL_ATTEMPT, task.attempt.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Builds the Job for the current attempt of `task`.
pub fn build_job(task: &Task, config: &LaunchConfig) -> Result<Job, SpecError> {
    let spec = &task.spec;
    let name = job_name(&task.id, task.attempt);

    // Tenant labels first, so ours always win (validation already refuses our prefix).
    let mut labels = spec.labels.clone();
    labels.extend(identity_labels(task));
    let mut job_labels = labels.clone();
    if let Some(queue) = &config.kueue_queue_name {
        job_labels.insert(LABEL_KUEUE_QUEUE.to_owned(), queue.clone());
    }

    let mut requests = BTreeMap::new();
    if let Some(cpu) = spec.resources.cpu {
        requests.insert("cpu".to_owned(), Quantity(cpu.to_string()));
    }
    if let Some(memory) = spec.resources.memory {
        requests.insert("memory".to_owned(), Quantity(memory.to_string()));
    }
    let mut node_selector = BTreeMap::new();
    let mut tolerations = Vec::new();
    if let Some(gpu) = &spec.resources.gpu {
        let class =
            config
                .gpu_classes
                .get(&gpu.class)
                .ok_or_else(|| SpecError::UnknownGpuClass {
                    task_id: task.id,
                    class: gpu.class.clone(),
                })?;
        requests.insert(class.resource_name.clone(), Quantity(gpu.count.to_string()));
        node_selector.extend(class.node_selector.clone());
        tolerations.extend(class.tolerations.iter().map(|t| Toleration {
            key: Some(t.key.clone()),
            operator: Some(t.operator.clone()),
            value: t.value.clone(),
            effect: t.effect.clone(),
            toleration_seconds: None,
        }));
    }
    // Limits equal requests: the task gets exactly what it pays for (Guaranteed QoS when
    // both CPU and memory are set), and extended resources require it anyway.
    let resources = (!requests.is_empty()).then(|| ResourceRequirements {
        limits: Some(requests.clone()),
        requests: Some(requests),
        ..ResourceRequirements::default()
    });

    let env: Vec<EnvVar> = spec
        .env
        .iter()
        .map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            value_from: None,
        })
        .collect();

    let container = Container {
        name: TASK_CONTAINER.to_owned(),
        image: Some(spec.image.clone()),
        command: (!spec.command.is_empty()).then(|| spec.command.clone()),
        args: (!spec.args.is_empty()).then(|| spec.args.clone()),
        env: (!env.is_empty()).then_some(env),
        resources,
        security_context: Some(restricted_container_context()),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    };

    let active_deadline = i64::from(spec.timeout_seconds);
    if active_deadline <= 0 {
        return Err(SpecError::Timeout {
            task_id: task.id,
            timeout_seconds: spec.timeout_seconds,
        });
    }

    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(config.namespace.clone()),
            labels: Some(job_labels),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            // Retries are new attempts with new Jobs, decided by the dispatcher per failure
            // class; the Job itself never re-runs a failed pod.
            backoff_limit: Some(0),
            active_deadline_seconds: Some(active_deadline),
            ttl_seconds_after_finished: Some(config.ttl_seconds_after_finished),
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![PodFailurePolicyRule {
                    // A pod lost to eviction, preemption or node drain is the cluster's
                    // fault: run it again without counting it as a failure.
                    action: "Ignore".to_owned(),
                    on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                        type_: "DisruptionTarget".to_owned(),
                        status: "True".to_owned(),
                    }]),
                    on_exit_codes: None,
                }],
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: (!spec.annotations.is_empty()).then(|| spec.annotations.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    node_selector: (!node_selector.is_empty()).then_some(node_selector),
                    tolerations: (!tolerations.is_empty()).then_some(tolerations),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(config.run_as_user),
                        run_as_group: Some(config.run_as_user),
                        fs_group: Some(config.run_as_user),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    })
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

fn restricted_container_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..SecurityContext::default()
    }
}

#[cfg(test)]
mod tests {
    use super::{LaunchConfig, build_job, job_name};
    use crate::task::fixtures::TaskFixture;
    use crate::task::submission::is_dns_label;

    fn rendered(task: &crate::task::Task) -> String {
        serde_json::to_string(&build_job(task, &LaunchConfig::default()).unwrap()).unwrap()
    }

    #[test]
    fn job_names_are_dns_labels_short_enough_for_pod_names() {
        let task = TaskFixture::new().attempt(999).obj();
        let name = job_name(&task.id, task.attempt);
        assert!(is_dns_label(&name), "{name}");
        // Pods append '-' and 5 characters.
        assert!(name.len() + 6 <= 63, "{name}");
    }

    #[test]
    fn the_same_task_builds_the_same_job() {
        let task = TaskFixture::new().gpus(2, "a100").obj();
        assert_eq!(rendered(&task), rendered(&task));
    }

    #[test]
    fn cpu_task() {
        let task = TaskFixture::new()
            .cpu("500m")
            .memory("1Gi")
            .env("MODE", "fast")
            .label("team", "vision")
            .obj();
        insta::assert_yaml_snapshot!(build_job(&task, &LaunchConfig::default()).unwrap());
    }

    #[test]
    fn one_v100() {
        let task = TaskFixture::new()
            .cpu("4")
            .memory("16Gi")
            .gpus(1, "v100")
            .obj();
        insta::assert_yaml_snapshot!(build_job(&task, &LaunchConfig::default()).unwrap());
    }

    #[test]
    fn eight_a100_in_a_kueue_cluster() {
        let task = TaskFixture::new()
            .cpu("32")
            .memory("256Gi")
            .gpus(8, "a100")
            .attempt(2)
            .obj();
        let config = LaunchConfig {
            kueue_queue_name: Some("gpu-training".into()),
            ..LaunchConfig::default()
        };
        insta::assert_yaml_snapshot!(build_job(&task, &config).unwrap());
    }

    #[test]
    fn mig_slice() {
        let task = TaskFixture::new()
            .gpus(1, "a100-mig-1g.10gb")
            .annotation("example.com/owner", "ml-team")
            .obj();
        insta::assert_yaml_snapshot!(build_job(&task, &LaunchConfig::default()).unwrap());
    }

    #[test]
    fn an_unconfigured_class_is_an_error_not_a_panic() {
        let task = TaskFixture::new().gpus(1, "tpu").obj();
        assert!(build_job(&task, &LaunchConfig::default()).is_err());
    }
}
