//! The Kubernetes Job for one attempt of a task: a pure, deterministic function of the
//! task and the launch configuration, snapshot-tested.
//!
//! Invariants:
//! - the Job's name depends only on the task id and attempt, so a second create of the
//!   same attempt collides (409) instead of making a second Job;
//! - the pod meets the Pod Security Standard `restricted` profile, whatever the task asks
//!   for, unless the operator gave its GPU class `security.profile: baseline` (then it
//!   meets `baseline`, and may run as the class's user, root included); the runner's init
//!   container is always `restricted`; tenants cannot set host paths, privileges, service
//!   accounts or the namespace;
//! - maps are ordered (`BTreeMap`), so the same input gives byte-identical output;
//! - the task's command always runs under the runner (`runner -- <command> <args>`),
//!   copied into the pod by an init container from the agent-bus image, so any glibc
//!   image reports heartbeats, usage and its real failure class;
//! - a GPU task that names no CPU or memory asks for its class's defaults
//!   ([`GpuClasses::effective_requests`], the figures the cost model and retries use);
//! - shared memory counts against the memory the pod asks for: `/dev/shm` is a
//!   memory-backed volume, so the request (and limit) is the task's memory, or its class's
//!   default, plus its shm size;
//! - a secret reference becomes a `secretKeyRef` to the tenant's own Secret: the Job
//!   never holds a secret's value.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Affinity, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, EphemeralVolumeSource,
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PersistentVolumeClaimSpec, PersistentVolumeClaimTemplate, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SecretKeySelector,
    SecurityContext, Toleration, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use protocol::env as runner_env;

use super::security_context::{
    restricted_container_context, runtime_default_seccomp, task_container_context,
};
use crate::placement::GpuClasses;
use crate::secrets::kubernetes as kubernetes_secrets;
use crate::task::{EnvValue, SecretRef, Task, TaskId};

/// Labels every Job and pod of ours carries.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "agent-bus";
pub const LABEL_TASK_ID: &str = "agent-bus.io/task-id";
pub const LABEL_TENANT: &str = "agent-bus.io/tenant";
pub const LABEL_QUEUE: &str = "agent-bus.io/queue";
pub const LABEL_ATTEMPT: &str = "agent-bus.io/attempt";
pub const LABEL_WORKLOAD: &str = "agent-bus.io/workload";
pub const LABEL_GPU_CLASS: &str = "agent-bus.io/gpu-class";
pub const LABEL_KUEUE_QUEUE: &str = "kueue.x-k8s.io/queue-name";
/// The name of the container that runs the task's command.
pub const TASK_CONTAINER: &str = "task";
/// The init container that copies the runner into the pod.
pub const RUNNER_INIT_CONTAINER: &str = "agent-bus-runner";
/// Where the runner lives inside the pod (an `emptyDir`, read-only for the task).
pub const RUNNER_DIR: &str = "/agent-bus/bin";
/// Where the runner is inside the agent-bus image.
pub const RUNNER_IN_IMAGE: &str = "/usr/local/bin/runner";
/// Seconds the Job's deadline leaves past the task's timeout, so the runner (which
/// enforces the timeout itself, with a grace period) can report why it stopped.
pub const DEADLINE_MARGIN_SECONDS: u32 = 30;

pub use crate::report::ReportAccess;

/// The namespace task Jobs are created in unless configured.
pub const DEFAULT_NAMESPACE: &str = "agent-bus-tasks";
/// How long Kubernetes keeps a finished Job unless configured.
pub const DEFAULT_TTL_AFTER_FINISHED: Duration = Duration::from_hours(24);
/// The user and group tasks run as unless configured (not root: `restricted` forbids it).
pub const DEFAULT_RUN_AS_USER: i64 = 65_532;
/// The agent-bus image of this version: it holds the runner at [`RUNNER_IN_IMAGE`].
pub const DEFAULT_RUNNER_IMAGE: &str =
    concat!("ghcr.io/agent-bus/agent-bus:", env!("CARGO_PKG_VERSION"));
/// The time between runner heartbeats unless configured.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);

/// When the kubelet pulls an image: a container's `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub const ALL: [Self; 3] = [Self::Always, Self::IfNotPresent, Self::Never];

    /// The value as Kubernetes spells it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// The init container that brings the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerInjection {
    /// The agent-bus image (it holds the runner at [`RUNNER_IN_IMAGE`]).
    pub image: String,
    /// `None`: Kubernetes' default for the image's tag.
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Between heartbeats, to the second.
    pub heartbeat: Duration,
}

impl Default for RunnerInjection {
    fn default() -> Self {
        Self {
            image: DEFAULT_RUNNER_IMAGE.to_owned(),
            image_pull_policy: None,
            heartbeat: DEFAULT_HEARTBEAT,
        }
    }
}

/// What the launcher needs besides the task to build its Job.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchConfig {
    pub namespace: String,
    pub gpu_classes: GpuClasses,
    /// Kubernetes deletes a finished Job this long after it finished (to the second): a
    /// backstop only, long enough for the watcher to have recorded the outcome.
    pub ttl_after_finished: Duration,
    /// The user and group the task runs as (the `restricted` profile forbids root).
    pub run_as_user: i64,
    /// When set, Jobs carry `kueue.x-k8s.io/queue-name` so a cluster's Kueue admits them.
    pub kueue_queue_name: Option<String>,
    pub runner: RunnerInjection,
    /// The StorageClass of scratch volumes; `None` uses the cluster's default class.
    pub scratch_storage_class: Option<String>,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.into(),
            gpu_classes: GpuClasses::default(),
            ttl_after_finished: DEFAULT_TTL_AFTER_FINISHED,
            run_as_user: DEFAULT_RUN_AS_USER,
            kueue_queue_name: None,
            runner: RunnerInjection::default(),
            scratch_storage_class: None,
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

fn env_var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// A variable the kubelet sets from the tenant's Secret when the container starts; a
/// missing Secret or key keeps the container from starting (`optional: false`), which
/// the watcher reads as a failed launch.
fn secret_env_var(name: &str, tenant: &str, reference: &SecretRef) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: kubernetes_secrets::object_name(tenant, &reference.secret),
                key: reference.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn empty_dir(name: &str, medium: Option<&str>, size: Option<String>) -> Volume {
    Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(str::to_owned),
            size_limit: size.map(Quantity),
        }),
        ..Volume::default()
    }
}

/// Builds the Job for the current attempt of `task`; `report` is how its runner reaches
/// the dispatcher (`None`: the runner runs the command and reports nowhere).
pub fn build_job(
    task: &Task,
    config: &LaunchConfig,
    report: Option<&ReportAccess>,
) -> Result<Job, SpecError> {
    let spec = &task.spec;
    let name = job_name(&task.id, task.attempt);

    // Tenant labels first, so ours always win (validation already refuses our prefix).
    let mut labels = spec.labels.clone();
    labels.extend(identity_labels(task));
    labels.insert(LABEL_WORKLOAD.to_owned(), spec.workload.as_str().to_owned());

    let class =
        match &spec.resources.gpu {
            Some(gpu) => {
                let class_name = task.gpu_class.as_deref().unwrap_or(&gpu.class);
                Some(config.gpu_classes.get(class_name).ok_or_else(|| {
                    SpecError::UnknownGpuClass {
                        task_id: task.id,
                        class: class_name.to_owned(),
                    }
                })?)
            }
            None => None,
        };
    // The task's own CPU and memory, else its class's defaults; /dev/shm on top.
    let (cpu, memory) = config.gpu_classes.effective_requests(
        class.map(|c| c.name.as_str()),
        spec.resources.cpu,
        spec.resources.memory,
    );
    let mut requests = BTreeMap::new();
    if let Some(cpu) = cpu {
        requests.insert("cpu".to_owned(), Quantity(cpu.to_string()));
    }
    if let Some(memory) = memory {
        let with_shm = spec.shm.map_or(memory, |shm| memory.saturating_add(shm));
        requests.insert("memory".to_owned(), Quantity(with_shm.to_string()));
    }
    let mut node_selector = BTreeMap::new();
    let mut tolerations = Vec::new();
    if let (Some(gpu), Some(class)) = (&spec.resources.gpu, class) {
        labels.insert(LABEL_GPU_CLASS.to_owned(), class.name.clone());
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
    let security = class.map(|c| c.security).unwrap_or_default();
    let run_as_user = security.run_as_user.unwrap_or(config.run_as_user);
    let runner_user = (run_as_user == 0).then_some(if config.run_as_user > 0 {
        config.run_as_user
    } else {
        DEFAULT_RUN_AS_USER
    });
    // Limits equal requests: the task gets exactly what it pays for (Guaranteed QoS when
    // both CPU and memory are set), and extended resources require it anyway.
    let mut job_labels = labels.clone();
    if let Some(queue) = &config.kueue_queue_name {
        job_labels.insert(LABEL_KUEUE_QUEUE.to_owned(), queue.clone());
    }
    let resources = (!requests.is_empty()).then(|| ResourceRequirements {
        limits: Some(requests.clone()),
        requests: Some(requests),
        ..ResourceRequirements::default()
    });

    let mut env: Vec<EnvVar> = spec
        .env
        .iter()
        .map(|(name, value)| match value {
            EnvValue::Plain(value) => env_var(name, value.clone()),
            EnvValue::Secret(reference) => secret_env_var(name, &task.tenant, reference),
        })
        .collect();
    // Validation refuses tenant variables starting with AGENT_BUS_, so these cannot clash.
    env.extend([
        env_var(runner_env::TASK_ID, task.id.to_string()),
        env_var(runner_env::ATTEMPT, task.attempt.to_string()),
        env_var(
            runner_env::TIMEOUT_SECONDS,
            spec.timeout_seconds.to_string(),
        ),
        env_var(
            runner_env::HEARTBEAT_SECONDS,
            config.runner.heartbeat.as_secs().to_string(),
        ),
    ]);
    if let Some(report) = report {
        env.push(env_var(runner_env::REPORT_URL, report.url.clone()));
        env.push(env_var(runner_env::REPORT_TOKEN, report.token.clone()));
    }

    let mut volumes = vec![empty_dir(
        RUNNER_INIT_CONTAINER,
        None,
        Some("64Mi".to_owned()),
    )];
    let mut mounts = vec![mount(RUNNER_INIT_CONTAINER, RUNNER_DIR, true)];
    if let Some(shm) = spec.shm {
        volumes.push(empty_dir("dshm", Some("Memory"), Some(shm.to_string())));
        mounts.push(mount("dshm", "/dev/shm", false));
    }
    for (index, volume) in spec.volumes.iter().enumerate() {
        let volume_name = format!("shared-{index}");
        volumes.push(Volume {
            name: volume_name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: volume.claim.clone(),
                read_only: volume.read_only.then_some(true),
            }),
            ..Volume::default()
        });
        mounts.push(mount(&volume_name, &volume.mount_path, volume.read_only));
    }
    if let Some(scratch) = &spec.scratch {
        volumes.push(Volume {
            name: "scratch".to_owned(),
            ephemeral: Some(EphemeralVolumeSource {
                volume_claim_template: Some(PersistentVolumeClaimTemplate {
                    metadata: Some(ObjectMeta {
                        labels: Some(identity_labels(task)),
                        ..ObjectMeta::default()
                    }),
                    spec: PersistentVolumeClaimSpec {
                        access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                        storage_class_name: config.scratch_storage_class.clone(),
                        resources: Some(VolumeResourceRequirements {
                            requests: Some(
                                [("storage".to_owned(), Quantity(scratch.size.to_string()))].into(),
                            ),
                            limits: None,
                        }),
                        ..PersistentVolumeClaimSpec::default()
                    },
                }),
            }),
            ..Volume::default()
        });
        mounts.push(mount("scratch", &scratch.mount_path, false));
    }

    let mut command = vec![format!("{RUNNER_DIR}/runner"), "--".to_owned()];
    command.extend(spec.command.iter().cloned());
    command.extend(spec.args.iter().cloned());

    let container = Container {
        name: TASK_CONTAINER.to_owned(),
        image: Some(spec.image.clone()),
        command: Some(command),
        env: Some(env),
        resources,
        volume_mounts: Some(mounts),
        security_context: Some(task_container_context(security.profile)),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    };
    let runner_resources: BTreeMap<String, Quantity> = [
        ("cpu".to_owned(), Quantity("50m".to_owned())),
        ("memory".to_owned(), Quantity("32Mi".to_owned())),
    ]
    .into();
    let init_container = Container {
        name: RUNNER_INIT_CONTAINER.to_owned(),
        image: Some(config.runner.image.clone()),
        image_pull_policy: config
            .runner
            .image_pull_policy
            .map(|policy| policy.as_str().to_owned()),
        command: Some(vec![
            RUNNER_IN_IMAGE.to_owned(),
            "install".to_owned(),
            RUNNER_DIR.to_owned(),
        ]),
        resources: Some(ResourceRequirements {
            limits: Some(runner_resources.clone()),
            requests: Some(runner_resources),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![mount(RUNNER_INIT_CONTAINER, RUNNER_DIR, false)]),
        security_context: Some(SecurityContext {
            // Under a root pod (a baseline class) the runner's installer still runs as a
            // user, or the kubelet would refuse its runAsNonRoot.
            run_as_user: runner_user,
            run_as_group: runner_user,
            ..restricted_container_context()
        }),
        ..Container::default()
    };

    let active_deadline = i64::from(spec.timeout_seconds) + i64::from(DEADLINE_MARGIN_SECONDS);
    if spec.timeout_seconds == 0 {
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
            // Saturated: a TTL past i32::MAX seconds (68 years) keeps the Job as long.
            ttl_seconds_after_finished: Some(
                i32::try_from(config.ttl_after_finished.as_secs()).unwrap_or(i32::MAX),
            ),
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
                    affinity: avoiding(&task.avoid_nodes),
                    tolerations: (!tolerations.is_empty()).then_some(tolerations),
                    security_context: Some(PodSecurityContext {
                        // Only a baseline class may run as root (the placement file's rule).
                        run_as_non_root: Some(run_as_user != 0),
                        run_as_user: Some(run_as_user),
                        run_as_group: Some(run_as_user),
                        fs_group: Some(run_as_user),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..PodSecurityContext::default()
                    }),
                    init_containers: Some(vec![init_container]),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    })
}

/// Node anti-affinity that keeps the pod off `nodes` (where an earlier attempt hit a
/// hardware failure); `None` when there are none.
fn avoiding(nodes: &[String]) -> Option<Affinity> {
    (!nodes.is_empty()).then(|| Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_fields: Some(vec![NodeSelectorRequirement {
                        key: "metadata.name".to_owned(),
                        operator: "NotIn".to_owned(),
                        values: Some(nodes.to_vec()),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    })
}

#[cfg(test)]
#[path = "job_spec_tests.rs"]
mod tests;
