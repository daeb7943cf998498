//! A tenant's submission as it arrives (`POST /v1/tasks`), and the rules that turn it into
//! a [`TaskSpec`]. Every refusal names the field (as a JSON path such as `env.MY VAR` or
//! `resources.gpu.class`) and the rule it broke, so a client can fix it without guessing.
//!
//! Invariants: [`validate`] is pure and total; whatever it accepts can be turned into a
//! Kubernetes Job without further checks on names, label syntax, quantities or sizes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::quantity::{Cpu, Memory};
use super::{GpuRequest, Resources, TaskSpec};
use crate::placement::GpuClasses;

/// The JSON body of a submission. Unknown fields are refused, so a misspelt option is an
/// error instead of being silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: ResourcesInput,
    pub timeout_seconds: Option<u32>,
    pub max_retries: Option<u32>,
    pub priority: Option<i32>,
    pub queue: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Resources as written by the tenant: quantities are strings until validated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcesInput {
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub gpu: Option<GpuInput>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuInput {
    pub count: u32,
    pub class: String,
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

/// The limits a submission is checked against; operators set them in configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub default_timeout_seconds: u32,
    pub max_timeout_seconds: u32,
    pub max_retries: u32,
    pub max_env_entries: usize,
    pub max_env_value_bytes: usize,
    pub max_command_entries: usize,
    pub max_argument_bytes: usize,
    pub max_labels: usize,
    pub max_annotations_bytes: usize,
    pub max_priority: i32,
    /// GPU classes the cluster offers, with the most GPUs one node of the class holds
    /// (by default those of [`GpuClasses::default`]).
    pub gpu_classes: BTreeMap<String, u32>,
    /// Annotation key prefixes tenants may use even inside a reserved domain (the test
    /// environment's `agent-bus.io/test-`); empty in production.
    pub allowed_annotation_prefixes: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_timeout_seconds: 3600,
            max_timeout_seconds: 7 * 24 * 3600,
            max_retries: 10,
            max_env_entries: 128,
            max_env_value_bytes: 32 * 1024,
            max_command_entries: 256,
            max_argument_bytes: 64 * 1024,
            max_labels: 32,
            max_annotations_bytes: 64 * 1024,
            max_priority: 1000,
            gpu_classes: GpuClasses::default().capacities(),
            allowed_annotation_prefixes: Vec::new(),
        }
    }
}

/// The queue a task lands in when the submission names none.
pub const DEFAULT_QUEUE: &str = "default";

/// Label and annotation prefix domains (and their subdomains) that belong to agent-bus or
/// Kubernetes; a tenant setting them could impersonate another task or change how the
/// cluster treats the pod.
const RESERVED_DOMAINS: [&str; 3] = ["agent-bus.io", "kubernetes.io", "k8s.io"];

/// Environment variables the runner sets; a tenant may not override them.
const RESERVED_ENV_PREFIX: &str = "AGENT_BUS_";

/// Checks `submission` against `limits` and returns the task's spec, or the first rule
/// it broke.
pub fn validate(submission: Submission, limits: &Limits) -> Result<TaskSpec, FieldError> {
    check_dns_label("name", &submission.name)?;
    check_image(&submission.image)?;
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
    let max_retries = submission.max_retries.unwrap_or(0);
    if max_retries > limits.max_retries {
        return Err(FieldError::new(
            "max_retries",
            format!("must be at most {}", limits.max_retries),
        ));
    }
    let priority = submission.priority.unwrap_or(0);
    if priority.abs() > limits.max_priority {
        return Err(FieldError::new(
            "priority",
            format!("must be between -{0} and {0}", limits.max_priority),
        ));
    }
    let queue = submission.queue.unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
    check_dns_label("queue", &queue)?;
    check_labels(&submission.labels, limits)?;
    check_annotations(&submission.annotations, limits)?;

    Ok(TaskSpec {
        name: submission.name,
        image: submission.image,
        command: submission.command,
        args: submission.args,
        env: submission.env,
        resources,
        timeout_seconds,
        max_retries,
        priority,
        queue,
        labels: submission.labels,
        annotations: submission.annotations,
    })
}

/// RFC 1123 label: lowercase alphanumerics and '-', starting and ending alphanumeric,
/// 1 to 63 characters.
pub fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
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

fn check_env(env: &BTreeMap<String, String>, limits: &Limits) -> Result<(), FieldError> {
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
        if name.starts_with(RESERVED_ENV_PREFIX) {
            return Err(FieldError::new(
                field,
                format!("names starting with {RESERVED_ENV_PREFIX} are reserved for agent-bus"),
            ));
        }
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
    Ok(())
}

fn check_resources(input: ResourcesInput, limits: &Limits) -> Result<Resources, FieldError> {
    let cpu = input
        .cpu
        .map(|text| text.parse::<Cpu>())
        .transpose()
        .map_err(|e| FieldError::new("resources.cpu", e.to_string()))?;
    let memory = input
        .memory
        .map(|text| text.parse::<Memory>())
        .transpose()
        .map_err(|e| FieldError::new("resources.memory", e.to_string()))?;
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
            Some(GpuRequest {
                count: gpu.count,
                class: gpu.class,
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
        if limits
            .allowed_annotation_prefixes
            .iter()
            .any(|prefix| key.starts_with(prefix.as_str()))
        {
            continue;
        }
        check_qualified_key(&format!("annotations.{key}"), key)?;
    }
    Ok(())
}

fn check_qualified_key(field: &str, key: &str) -> Result<(), FieldError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let valid_prefix =
            !prefix.is_empty() && prefix.len() <= 253 && prefix.split('.').all(is_dns_label);
        if !valid_prefix {
            return Err(FieldError::new(
                field,
                "key prefix must be a DNS subdomain of at most 253 characters",
            ));
        }
        let reserved = RESERVED_DOMAINS.iter().any(|domain| {
            prefix == *domain
                || prefix
                    .strip_suffix(domain)
                    .is_some_and(|sub| sub.ends_with('.'))
        });
        if reserved {
            return Err(FieldError::new(
                field,
                format!("key prefix {prefix}/ is reserved"),
            ));
        }
    }
    if !is_label_name(name) {
        return Err(FieldError::new(
            field,
            "key name must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

fn is_label_name(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::{FieldError, GpuInput, Limits, Submission, validate};

    /// A fluent fixture: `submission().gpu(2, "a100").obj()`.
    struct Fixture(Submission);

    fn submission() -> Fixture {
        Fixture(Submission {
            name: "train-resnet".into(),
            image: "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime".into(),
            command: vec!["python".into(), "train.py".into()],
            ..Submission::default()
        })
    }

    impl Fixture {
        fn with(mut self, change: impl FnOnce(&mut Submission)) -> Self {
            change(&mut self.0);
            self
        }
        fn gpu(self, count: u32, class: &str) -> Self {
            self.with(|s| {
                s.resources.gpu = Some(GpuInput {
                    count,
                    class: class.into(),
                });
            })
        }
        fn env(self, name: &str, value: &str) -> Self {
            self.with(|s| {
                s.env.insert(name.into(), value.into());
            })
        }
        fn label(self, key: &str, value: &str) -> Self {
            self.with(|s| {
                s.labels.insert(key.into(), value.into());
            })
        }
        fn field_error(self) -> FieldError {
            validate(self.0, &Limits::default()).expect_err("should be refused")
        }
    }

    #[test]
    fn a_plain_submission_gets_the_defaults() {
        let spec = validate(submission().0, &Limits::default()).unwrap();
        assert_eq!(spec.queue, "default");
        assert_eq!(spec.timeout_seconds, 3600);
        assert_eq!(spec.max_retries, 0);
        assert_eq!(spec.priority, 0);
        assert_eq!(spec.resources.gpu, None);
    }

    #[test]
    fn resources_are_parsed() {
        let spec = validate(
            submission()
                .with(|s| {
                    s.resources.cpu = Some("500m".into());
                    s.resources.memory = Some("2Gi".into());
                })
                .gpu(2, "a100")
                .0,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(spec.resources.cpu.unwrap().millicores(), 500);
        assert_eq!(spec.resources.memory.unwrap().bytes(), 2 << 30);
        assert_eq!(spec.resources.gpu.unwrap().count, 2);
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases: Vec<(Fixture, &str)> = vec![
            (submission().with(|s| s.name = "Train_Model".into()), "name"),
            (submission().with(|s| s.name = "a".repeat(64)), "name"),
            (submission().with(|s| s.name = String::new()), "name"),
            (
                submission().with(|s| s.image = "has space:1".into()),
                "image",
            ),
            (submission().with(|s| s.image = String::new()), "image"),
            (
                submission().with(|s| s.resources.cpu = Some("-1".into())),
                "resources.cpu",
            ),
            (
                submission().with(|s| s.resources.cpu = Some("lots".into())),
                "resources.cpu",
            ),
            (
                submission().with(|s| s.resources.memory = Some("1Zi".into())),
                "resources.memory",
            ),
            (submission().gpu(1, "k80"), "resources.gpu.class"),
            (submission().gpu(9, "a100"), "resources.gpu.count"),
            (submission().gpu(0, "a100"), "resources.gpu.count"),
            (
                submission().with(|s| s.timeout_seconds = Some(0)),
                "timeout_seconds",
            ),
            (
                submission().with(|s| s.timeout_seconds = Some(8 * 24 * 3600)),
                "timeout_seconds",
            ),
            (
                submission().with(|s| s.max_retries = Some(11)),
                "max_retries",
            ),
            (submission().with(|s| s.priority = Some(1001)), "priority"),
            (
                submission().with(|s| s.queue = Some("GPU Queue".into())),
                "queue",
            ),
            (submission().env("MY VAR", "x"), "env.MY VAR"),
            (submission().env("1ST", "x"), "env.1ST"),
            (
                submission().env("AGENT_BUS_TOKEN", "x"),
                "env.AGENT_BUS_TOKEN",
            ),
            (submission().env("BIG", &"x".repeat(40_000)), "env.BIG"),
            (submission().label("team", &"x".repeat(64)), "labels.team"),
            (
                submission().label("agent-bus.io/task-id", "x"),
                "labels.agent-bus.io/task-id",
            ),
            (submission().label("bad key!", "x"), "labels.bad key!"),
            (
                submission().label("node.kubernetes.io/x", "x"),
                "labels.node.kubernetes.io/x",
            ),
            (
                submission().with(|s| s.command = vec!["a\0b".into()]),
                "command[0]",
            ),
        ];
        for (fixture, field) in cases {
            let error = fixture.field_error();
            assert_eq!(error.field, field, "{error}");
            assert!(!error.message.is_empty());
        }
    }

    #[test]
    fn allowed_annotation_prefixes_open_only_what_they_name() {
        let limits = Limits {
            allowed_annotation_prefixes: vec!["agent-bus.io/test-".into()],
            ..Limits::default()
        };
        let with = |key: &str| {
            submission().with(|s| {
                s.annotations.insert(key.into(), "3".into());
            })
        };
        assert!(validate(with("agent-bus.io/test-exit-code").0, &limits).is_ok());
        assert_eq!(
            validate(with("agent-bus.io/task-id").0, &limits)
                .unwrap_err()
                .field,
            "annotations.agent-bus.io/task-id"
        );
        assert!(validate(with("agent-bus.io/test-exit-code").0, &Limits::default()).is_err());
    }

    #[test]
    fn lookalike_domains_are_not_reserved() {
        let spec = validate(
            submission().label("mykubernetes.io/team", "ml").0,
            &Limits::default(),
        );
        assert!(spec.is_ok(), "{spec:?}");
    }

    #[test]
    fn too_many_entries_are_refused() {
        let many_env = (0..129).fold(submission(), |f, i| f.env(&format!("V{i}"), "x"));
        assert_eq!(many_env.field_error().field, "env");
        let many_labels = (0..33).fold(submission(), |f, i| f.label(&format!("l{i}"), "x"));
        assert_eq!(many_labels.field_error().field, "labels");
        let big_annotations = submission().with(|s| {
            s.annotations.insert("note".into(), "x".repeat(70_000));
        });
        assert_eq!(big_annotations.field_error().field, "annotations");
    }

    #[test]
    fn unknown_fields_are_refused_by_the_wire_shape() {
        let error =
            serde_json::from_str::<Submission>(r#"{"name":"a","image":"b","gpus":1}"#).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `gpus`"),
            "{error}"
        );
    }
}
