//! A tenant's submission as it arrives (`POST /v1/tasks`), and the rules that turn it into
//! a [`TaskSpec`]. Every refusal names the field (as a JSON path such as `env.MY VAR` or
//! `resources.gpu.class`) and the rule it broke, so a client can fix it without guessing.
//! Which keys and names a tenant may set at all is `keys`'s decision; how much it may
//! ask for is [`Limits`].
//!
//! Invariants: [`validate`] is pure and total; whatever it accepts can be turned into a
//! Kubernetes Job without further checks on names, label syntax, quantities or sizes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::quantity::{Cpu, Memory};
use super::retry::{
    Factor, FailureClass, MAX_BACKOFF_CAP_SECONDS, MAX_BACKOFF_SECONDS, MAX_MATCHES_PER_RULE,
    MAX_MEMORY_FACTOR, MAX_RULES, Mutation, RetryAction, RetryPolicy, RetryRule,
};
use super::webhook::{WebhookInput, check_webhook};
use super::workload;
use super::{
    EnvValue, GpuRequest, Resources, Scratch, SecretRef, TaskSpec, VolumeMount, WorkloadRequest,
};
pub use crate::k8s::names::{is_class_name, is_dns_label};
use crate::k8s::names::{is_label_name, is_secret_key};
mod keys;
mod limits;
pub mod objects;

objects::objects_only!(
    Submission,
    VolumeInput,
    ScratchInput,
    ResourcesInput,
    GpuInput,
    RetryPolicyInput,
    RetryRuleInput,
    MutationInput,
    WebhookInput,
);

pub use keys::{KeyPrefix, RESERVED_DOMAINS, RESERVED_ENV, TEST_PREFIX, reserved_env_name};
pub use limits::{Limits, MAX_QUEUE_TTL_SECONDS, ShmRule};

/// The JSON body of a submission. Unknown fields are refused, so a misspelt option is an
/// error instead of being silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct Submission {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables of the task: each value a string, or
    /// `{"secret": NAME, "key": KEY}`, a key of one of the tenant's secrets, set when the
    /// command starts and never stored with the task. Names the runtime, the loader or the
    /// runner act on are refused: `AGENT_BUS_*`, `NVIDIA_*`, `CUDA_VISIBLE_DEVICES`, `LD_*`,
    /// `GCONV_PATH`, `GLIBC_TUNABLES`, `LOCALDOMAIN`, `RES_OPTIONS`, `HOSTALIASES`.
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default)]
    pub resources: ResourcesInput,
    pub timeout_seconds: Option<u32>,
    pub max_retries: Option<u32>,
    /// How failed attempts are retried: backoff and ordered rules (first match wins),
    /// checked before the operator's default rules.
    pub retry_policy: Option<RetryPolicyInput>,
    /// How long the task may wait to be launched before it expires (state `expired`,
    /// reason `queue_ttl`); by default the tenant's queue TTL, if it has one.
    pub queue_ttl_seconds: Option<u32>,
    pub priority: Option<i32>,
    pub queue: Option<String>,
    /// Labels of the task and its pod: only keys under a prefix the operator allows
    /// (`--tenant-label-prefixes`; none by default), never unprefixed keys or
    /// kubernetes.io, k8s.io, *.x-k8s.io and agent-bus.io ones.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations of the pod, under the same rule with the operator's
    /// `--tenant-annotation-prefixes`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// `ml`, `cv`, `cpu` or `auto` (the default: decided from the GPU request, the image
    /// and the command).
    pub workload: Option<WorkloadRequest>,
    /// Size of `/dev/shm`, e.g. `8Gi`, at most the operator's maximum (`--max-task-shm`,
    /// 256Gi by default). By default ML and CV tasks get a share of their memory request
    /// (see the shm rule in the configuration), others the runtime default.
    pub shm: Option<String>,
    /// Shared PersistentVolumeClaims to mount.
    #[serde(default)]
    pub volumes: Vec<VolumeInput>,
    /// A per-task scratch volume, created with the pod and deleted with it.
    pub scratch: Option<ScratchInput>,
    /// Where the task's state changes are POSTed, signed with the tenant's webhook
    /// secret (docs/WEBHOOKS.md); by default the tenant's webhook, if any.
    // Left out when absent, so the idempotency hash of a submission without one is the
    // same as before webhooks existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookInput>,
}

/// A shared claim to mount, as written by the tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct VolumeInput {
    pub claim: String,
    /// Absolute path; by default `/mnt/<claim>`.
    pub mount_path: Option<String>,
    /// Default `true`; `false` only for claims the operator shares writable.
    pub read_only: Option<bool>,
}

/// A scratch volume, as written by the tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct ScratchInput {
    /// e.g. `100Gi`.
    pub size: String,
    /// Absolute path; by default `/scratch`.
    pub mount_path: Option<String>,
}

/// Resources as written by the tenant: quantities are strings until validated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct ResourcesInput {
    /// CPU request and limit, a Kubernetes quantity (`500m`, `4`); at most the operator's
    /// per-task maximum (`--max-task-cpu`, 64 cores by default). Absent on a GPU task: its
    /// GPU class's default (4 cores for the built-in classes).
    pub cpu: Option<String>,
    /// Memory request and limit (`512Mi`, `32Gi`); at most the operator's per-task
    /// maximum (`--max-task-memory`, 512Gi by default). Absent on a GPU task: its GPU
    /// class's default (8Gi for the built-in classes). The pod asks for this plus `shm`.
    pub memory: Option<String>,
    pub gpu: Option<GpuInput>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct GpuInput {
    /// At least 1; at most what one node of the class holds and the operator's per-task
    /// maximum (`--max-task-gpus`, 8 by default).
    pub count: u32,
    pub class: String,
    /// Default `true`: a task no node of `class` can take in time moves to the class's
    /// fallbacks.
    pub allow_fallback: Option<bool>,
}

/// A retry policy as written by the tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct RetryPolicyInput {
    /// The first backoff in seconds (0 to 3600); each further attempt doubles it.
    pub backoff_seconds: Option<u32>,
    /// The longest backoff in seconds (1 to a day; one below `backoff_seconds` counts as
    /// `backoff_seconds`).
    pub max_backoff_seconds: Option<u32>,
    /// At most 16, checked in order; the first that matches decides.
    #[serde(default)]
    pub rules: Vec<RetryRuleInput>,
}

/// One retry rule as written by the tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct RetryRuleInput {
    /// `retry`, `fail` or `ignore` (retry without counting the attempt).
    pub action: RetryAction,
    /// Exit codes (1 to 255) the rule matches; empty: any.
    #[serde(default)]
    pub on_exit_codes: Vec<i32>,
    /// Failure classes the rule matches; empty: any.
    #[serde(default)]
    pub on_failure_classes: Vec<FailureClass>,
    /// What the next attempt changes (only with `retry` or `ignore`).
    pub mutate: Option<MutationInput>,
}

/// What a retry changes, as written by the tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct MutationInput {
    /// Memory times this factor (above 1, at most 4).
    pub memory_factor: Option<f64>,
    /// Move to the next GPU class with more memory per GPU.
    pub next_gpu_class: Option<bool>,
    /// Keep the next attempts off the node that failed.
    pub avoid_failed_node: Option<bool>,
}

/// A submission broke a rule: which field, and what the rule is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The queue a task lands in when the submission names none.
pub const DEFAULT_QUEUE: &str = "default";

/// Paths a volume may not be mounted at or under: the runner's folder, and the kernel's.
const RESERVED_MOUNT_PATHS: [&str; 4] = ["/agent-bus", "/dev", "/proc", "/sys"];

/// Checks `submission` of `tenant` against `limits` and returns the task's spec, or the
/// first rule it broke.
pub fn validate(
    submission: Submission,
    limits: &Limits,
    tenant: &str,
) -> Result<TaskSpec, FieldError> {
    check_dns_label("name", &submission.name)?;
    check_image(&submission.image)?;
    if submission.command.is_empty() {
        return Err(FieldError::new(
            "command",
            "is required: the runner wraps the command, and an image's entrypoint is not \
             known before the pod starts (give the entrypoint here, arguments in args)",
        ));
    }
    check_strings("command", &submission.command, limits)?;
    check_strings("args", &submission.args, limits)?;
    check_env(&submission.env, limits)?;
    let resources = check_resources(submission.resources, limits)?;

    let timeout_seconds = submission
        .timeout_seconds
        .unwrap_or(limits.default_timeout_seconds);
    if timeout_seconds == 0 || timeout_seconds > limits.max_timeout_seconds {
        return Err(FieldError::new(
            "timeout_seconds",
            format!(
                "must be between 1 and {} seconds",
                limits.max_timeout_seconds
            ),
        ));
    }
    if let Some(ttl) = submission.queue_ttl_seconds
        && (ttl == 0 || ttl > limits.max_queue_ttl_seconds)
    {
        return Err(FieldError::new(
            "queue_ttl_seconds",
            format!(
                "must be between 1 and {} seconds",
                limits.max_queue_ttl_seconds
            ),
        ));
    }
    let max_retries = submission.max_retries.unwrap_or(0);
    if max_retries > limits.max_retries {
        return Err(FieldError::new(
            "max_retries",
            format!("must be at most {}", limits.max_retries),
        ));
    }
    let retry_policy = submission
        .retry_policy
        .map(check_retry_policy)
        .transpose()?;
    let priority = submission.priority.unwrap_or(0);
    if priority.abs() > limits.max_priority {
        return Err(FieldError::new(
            "priority",
            format!("must be between -{0} and {0}", limits.max_priority),
        ));
    }
    let queue = submission.queue.unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
    check_dns_label("queue", &queue)?;
    if !limits.queues.is_empty() && !limits.queues.contains(&queue) {
        let declared: Vec<&str> = limits.queues.iter().map(String::as_str).collect();
        return Err(FieldError::new(
            "queue",
            format!(
                "'{queue}' is not a queue of this dispatcher: one of {}",
                declared.join(", ")
            ),
        ));
    }
    check_labels(&submission.labels, limits)?;
    check_annotations(&submission.annotations, limits)?;
    let webhook = submission
        .webhook
        .map(|input| check_webhook(input, &limits.webhook_destinations))
        .transpose()
        .map_err(|(field, message)| FieldError::new(field, message))?;

    let argv: Vec<String> = submission
        .command
        .iter()
        .chain(&submission.args)
        .cloned()
        .collect();
    let workload = workload::detect(
        submission.workload.unwrap_or_default(),
        &submission.image,
        &argv,
        resources.gpu.is_some(),
    );
    let shm = match submission.shm {
        Some(text) => {
            let size = text
                .parse::<Memory>()
                .map_err(|e| FieldError::new("shm", e.to_string()))?;
            if size > limits.max_shm {
                return Err(FieldError::new(
                    "shm",
                    format!("must be at most {}", limits.max_shm),
                ));
            }
            Some(size)
        }
        None => workload
            .wants_shared_memory()
            .then(|| limits.shm_rule.size(resources.memory)),
    };
    let (volumes, scratch) = check_volumes(submission.volumes, submission.scratch, limits, tenant)?;

    Ok(TaskSpec {
        name: submission.name,
        image: submission.image,
        command: submission.command,
        args: submission.args,
        env: submission.env,
        resources,
        timeout_seconds,
        max_retries,
        retry_policy,
        queue_ttl_seconds: submission.queue_ttl_seconds,
        priority,
        queue,
        labels: submission.labels,
        annotations: submission.annotations,
        workload,
        shm,
        volumes,
        scratch,
        webhook,
    })
}

fn check_mount_path(field: &str, path: &str) -> Result<(), FieldError> {
    let normal = path.starts_with('/')
        && path.len() > 1
        && path.len() <= 256
        && !path.ends_with('/')
        && path
            .split('/')
            .skip(1)
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'));
    if !normal {
        return Err(FieldError::new(
            field,
            "must be an absolute path of at most 256 letters, digits, '-', '_', '.' and '/', \
             without '.', '..', empty parts or a trailing '/'",
        ));
    }
    let reserved = RESERVED_MOUNT_PATHS.iter().find(|reserved| {
        path == **reserved
            || path
                .strip_prefix(**reserved)
                .is_some_and(|rest| rest.starts_with('/'))
    });
    if let Some(reserved) = reserved {
        return Err(FieldError::new(
            field,
            format!("must not be {reserved} or under it (reserved)"),
        ));
    }
    Ok(())
}

fn check_volumes(
    volumes: Vec<VolumeInput>,
    scratch: Option<ScratchInput>,
    limits: &Limits,
    tenant: &str,
) -> Result<(Vec<VolumeMount>, Option<Scratch>), FieldError> {
    if volumes.len() > limits.max_volumes {
        return Err(FieldError::new(
            "volumes",
            format!("must have at most {} entries", limits.max_volumes),
        ));
    }
    let mut paths: BTreeMap<String, String> = BTreeMap::new();
    let mut mounts = Vec::with_capacity(volumes.len());
    for (index, volume) in volumes.into_iter().enumerate() {
        let field = |name: &str| format!("volumes[{index}].{name}");
        let shared = limits
            .volume_claims
            .get(&volume.claim)
            .filter(|claim| claim.allows(tenant));
        let Some(shared) = shared else {
            return Err(FieldError::new(
                field("claim"),
                format!(
                    "claim '{}' is not shared with tenant '{tenant}' (ask the operator to add it to the placement file's volume_claims)",
                    volume.claim
                ),
            ));
        };
        if mounts.iter().any(|m: &VolumeMount| m.claim == volume.claim) {
            return Err(FieldError::new(field("claim"), "is mounted twice"));
        }
        let read_only = volume.read_only.unwrap_or(true);
        if !read_only && !shared.writable {
            return Err(FieldError::new(
                field("read_only"),
                format!("claim '{}' is shared read-only", volume.claim),
            ));
        }
        let mount_path = volume
            .mount_path
            .unwrap_or_else(|| format!("/mnt/{}", volume.claim));
        check_mount_path(&field("mount_path"), &mount_path)?;
        if let Some(other) = paths.insert(mount_path.clone(), field("mount_path")) {
            return Err(FieldError::new(
                field("mount_path"),
                format!("is already used by {other}"),
            ));
        }
        mounts.push(VolumeMount {
            claim: volume.claim,
            mount_path,
            read_only,
        });
    }
    let scratch = match scratch {
        None => None,
        Some(scratch) => {
            let size = scratch
                .size
                .parse::<Memory>()
                .map_err(|e| FieldError::new("scratch.size", e.to_string()))?;
            if size > limits.max_scratch {
                return Err(FieldError::new(
                    "scratch.size",
                    format!("must be at most {}", limits.max_scratch),
                ));
            }
            let mount_path = scratch.mount_path.unwrap_or_else(|| "/scratch".to_owned());
            check_mount_path("scratch.mount_path", &mount_path)?;
            if let Some(other) = paths.get(&mount_path) {
                return Err(FieldError::new(
                    "scratch.mount_path",
                    format!("is already used by {other}"),
                ));
            }
            Some(Scratch { size, mount_path })
        }
    };
    Ok((mounts, scratch))
}

fn check_dns_label(field: &str, value: &str) -> Result<(), FieldError> {
    if is_dns_label(value) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be an RFC 1123 label: 1 to 63 lowercase letters, digits or '-', \
             starting and ending with a letter or digit",
        ))
    }
}

fn check_image(image: &str) -> Result<(), FieldError> {
    let well_formed = !image.is_empty()
        && image.len() <= 512
        && !image.starts_with(['/', ':', '@', '-'])
        && image.chars().all(|c| c.is_ascii_graphic());
    if well_formed {
        Ok(())
    } else {
        Err(FieldError::new(
            "image",
            "must be an image reference (registry/name:tag or @digest) of at most 512 \
             printable characters without spaces",
        ))
    }
}

fn check_strings(field: &str, values: &[String], limits: &Limits) -> Result<(), FieldError> {
    if values.len() > limits.max_command_entries {
        return Err(FieldError::new(
            field,
            format!("must have at most {} entries", limits.max_command_entries),
        ));
    }
    let total: usize = values.iter().map(String::len).sum();
    if total > limits.max_argument_bytes {
        return Err(FieldError::new(
            field,
            format!("must total at most {} bytes", limits.max_argument_bytes),
        ));
    }
    if let Some(index) = values.iter().position(|v| v.contains('\0')) {
        return Err(FieldError::new(
            format!("{field}[{index}]"),
            "must not contain NUL characters",
        ));
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, EnvValue>, limits: &Limits) -> Result<(), FieldError> {
    if env.len() > limits.max_env_entries {
        return Err(FieldError::new(
            "env",
            format!("must have at most {} entries", limits.max_env_entries),
        ));
    }
    for (name, value) in env {
        let field = format!("env.{name}");
        let mut chars = name.chars();
        let valid_name = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && name.len() <= 256;
        if !valid_name {
            return Err(FieldError::new(
                field,
                "name must be letters, digits and '_', not starting with a digit, at most 256 characters",
            ));
        }
        if let Some(why) = reserved_env_name(name) {
            return Err(FieldError::new(field, why));
        }
        check_env_value(field, value, limits)?;
    }
    Ok(())
}

/// A plain value's size and characters, or a secret reference's syntax (whether the
/// secret and its key exist is the API's check: it needs the secret store).
fn check_env_value(field: String, value: &EnvValue, limits: &Limits) -> Result<(), FieldError> {
    match value {
        EnvValue::Plain(value) => {
            if value.len() > limits.max_env_value_bytes {
                return Err(FieldError::new(
                    field,
                    format!("value must be at most {} bytes", limits.max_env_value_bytes),
                ));
            }
            if value.contains('\0') {
                return Err(FieldError::new(
                    field,
                    "value must not contain NUL characters",
                ));
            }
        }
        EnvValue::Secret(SecretRef { secret, key }) => {
            if !is_dns_label(secret) {
                return Err(FieldError::new(
                    format!("{field}.secret"),
                    "must be a secret name: 1 to 63 lowercase letters, digits or '-', \
                     starting and ending with a letter or digit",
                ));
            }
            if !is_secret_key(key) {
                return Err(FieldError::new(
                    format!("{field}.key"),
                    "must be a secret key: 1 to 253 letters, digits, '-', '_' or '.' (not '.' or '..')",
                ));
            }
        }
    }
    Ok(())
}

fn check_resources(input: ResourcesInput, limits: &Limits) -> Result<Resources, FieldError> {
    let cpu = input
        .cpu
        .map(|text| text.parse::<Cpu>())
        .transpose()
        .map_err(|e| FieldError::new("resources.cpu", e.to_string()))?;
    if let Some(cpu) = cpu
        && cpu > limits.max_cpu
    {
        return Err(FieldError::new(
            "resources.cpu",
            format!(
                "must be at most {}, the most one task may ask for",
                limits.max_cpu
            ),
        ));
    }
    let memory = input
        .memory
        .map(|text| text.parse::<Memory>())
        .transpose()
        .map_err(|e| FieldError::new("resources.memory", e.to_string()))?;
    if let Some(memory) = memory
        && memory > limits.max_memory
    {
        return Err(FieldError::new(
            "resources.memory",
            format!(
                "must be at most {}, the most one task may ask for",
                limits.max_memory
            ),
        ));
    }
    let gpu = match input.gpu {
        None => None,
        Some(gpu) => {
            let Some(per_node) = limits.gpu_classes.get(&gpu.class) else {
                let known: Vec<&str> = limits.gpu_classes.keys().map(String::as_str).collect();
                return Err(FieldError::new(
                    "resources.gpu.class",
                    format!(
                        "unknown GPU class '{}'; known classes: {}",
                        gpu.class,
                        known.join(", ")
                    ),
                ));
            };
            if gpu.count == 0 || gpu.count > *per_node {
                return Err(FieldError::new(
                    "resources.gpu.count",
                    format!(
                        "must be between 1 and {per_node}, the most one {} node holds",
                        gpu.class
                    ),
                ));
            }
            if gpu.count > limits.max_gpus {
                return Err(FieldError::new(
                    "resources.gpu.count",
                    format!(
                        "must be between 1 and {}, the most GPUs one task may ask for",
                        limits.max_gpus
                    ),
                ));
            }
            Some(GpuRequest {
                count: gpu.count,
                class: gpu.class,
                allow_fallback: gpu.allow_fallback.unwrap_or(true),
            })
        }
    };
    Ok(Resources { cpu, memory, gpu })
}

/// Kubernetes label syntax: an optional DNS-subdomain prefix and '/', then a name of at
/// most 63 characters; values at most 63 characters of the same alphabet, or empty.
fn check_labels(labels: &BTreeMap<String, String>, limits: &Limits) -> Result<(), FieldError> {
    if labels.len() > limits.max_labels {
        return Err(FieldError::new(
            "labels",
            format!("must have at most {} entries", limits.max_labels),
        ));
    }
    for (key, value) in labels {
        let field = format!("labels.{key}");
        check_qualified_key(&field, key)?;
        keys::check_key("label", key, &limits.label_prefixes)
            .map_err(|message| FieldError::new(&field, message))?;
        if !(value.is_empty() || is_label_name(value)) {
            return Err(FieldError::new(
                field,
                "value must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            ));
        }
    }
    Ok(())
}

fn check_annotations(
    annotations: &BTreeMap<String, String>,
    limits: &Limits,
) -> Result<(), FieldError> {
    let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > limits.max_annotations_bytes {
        return Err(FieldError::new(
            "annotations",
            format!("must total at most {} bytes", limits.max_annotations_bytes),
        ));
    }
    for key in annotations.keys() {
        let field = format!("annotations.{key}");
        check_qualified_key(&field, key)?;
        keys::check_key("annotation", key, &limits.annotation_prefixes)
            .map_err(|message| FieldError::new(&field, message))?;
    }
    Ok(())
}

/// Kubernetes key syntax (an optional DNS-subdomain prefix and '/', then a name); which
/// keys a tenant may use is [`keys::check_key`]'s decision.
fn check_qualified_key(field: &str, key: &str) -> Result<(), FieldError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && !keys::is_dns_subdomain(prefix)
    {
        return Err(FieldError::new(
            field,
            "key prefix must be a DNS subdomain of at most 253 characters",
        ));
    }
    if !is_label_name(name) {
        return Err(FieldError::new(
            field,
            "key name must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

/// Checks a retry policy: bounded backoff, at most [`MAX_RULES`] rules of at most
/// [`MAX_MATCHES_PER_RULE`] exit codes and classes each, exit codes a process can have,
/// and changes only where a new attempt follows.
fn check_retry_policy(input: RetryPolicyInput) -> Result<RetryPolicy, FieldError> {
    if let Some(backoff) = input.backoff_seconds
        && backoff > MAX_BACKOFF_SECONDS
    {
        return Err(FieldError::new(
            "retry_policy.backoff_seconds",
            format!("must be between 0 and {MAX_BACKOFF_SECONDS} seconds"),
        ));
    }
    // A cap below `backoff_seconds` counts as `backoff_seconds` (`retry::backoff`): a
    // rule of one field, as the OpenAPI document can state it.
    if let Some(cap) = input.max_backoff_seconds
        && !(1..=MAX_BACKOFF_CAP_SECONDS).contains(&cap)
    {
        return Err(FieldError::new(
            "retry_policy.max_backoff_seconds",
            format!("must be between 1 and {MAX_BACKOFF_CAP_SECONDS} seconds"),
        ));
    }
    if input.rules.len() > MAX_RULES {
        return Err(FieldError::new(
            "retry_policy.rules",
            format!("must have at most {MAX_RULES} rules"),
        ));
    }
    let mut rules = Vec::with_capacity(input.rules.len());
    for (index, rule) in input.rules.into_iter().enumerate() {
        let field = |name: &str| format!("retry_policy.rules[{index}].{name}");
        if rule.on_exit_codes.len() > MAX_MATCHES_PER_RULE {
            return Err(FieldError::new(
                field("on_exit_codes"),
                format!("must list at most {MAX_MATCHES_PER_RULE} exit codes"),
            ));
        }
        if let Some(code) = rule.on_exit_codes.iter().find(|c| !(1..=255).contains(*c)) {
            return Err(FieldError::new(
                field("on_exit_codes"),
                format!("{code} is not the exit code of a failure (1 to 255)"),
            ));
        }
        if rule.on_failure_classes.len() > MAX_MATCHES_PER_RULE {
            return Err(FieldError::new(
                field("on_failure_classes"),
                format!("must list at most {MAX_MATCHES_PER_RULE} classes"),
            ));
        }
        let mutate = match rule.mutate {
            None => Mutation::default(),
            Some(_) if rule.action == RetryAction::Fail => {
                return Err(FieldError::new(
                    field("mutate"),
                    "only a rule that retries (retry or ignore) can change the next attempt",
                ));
            }
            Some(mutate) => Mutation {
                memory_factor: match mutate.memory_factor {
                    None => None,
                    Some(factor) => Some(Factor::new(factor).ok_or_else(|| {
                        FieldError::new(
                            field("mutate.memory_factor"),
                            format!("must be above 1 and at most {MAX_MEMORY_FACTOR}"),
                        )
                    })?),
                },
                next_gpu_class: mutate.next_gpu_class.unwrap_or(false),
                avoid_failed_node: mutate.avoid_failed_node.unwrap_or(false),
            },
        };
        rules.push(RetryRule {
            action: rule.action,
            on_exit_codes: rule.on_exit_codes,
            on_failure_classes: rule.on_failure_classes,
            mutate,
        });
    }
    Ok(RetryPolicy {
        backoff_seconds: input.backoff_seconds,
        max_backoff_seconds: input.max_backoff_seconds,
        rules,
    })
}
