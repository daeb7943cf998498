use super::{
    FieldError, GpuInput, Limits, MutationInput, RetryPolicyInput, RetryRuleInput, ScratchInput,
    Submission, VolumeInput, validate,
};
use crate::placement::SharedClaim;
use crate::task::retry::{FailureClass, RetryAction, RetryPolicy};
use crate::task::{WorkloadKind, WorkloadRequest};

fn shared(name: &str, tenants: &[&str], writable: bool) -> (String, SharedClaim) {
    (
        name.to_owned(),
        SharedClaim {
            name: name.to_owned(),
            tenants: tenants.iter().map(|&t| t.to_owned()).collect(),
            writable,
        },
    )
}

/// Limits with three shared claims: models (everyone, read-only), datasets (globex
/// only), scratch-a (acme, writable).
fn limits_with_claims() -> Limits {
    Limits {
        volume_claims: [
            shared("models", &["*"], false),
            shared("datasets", &["globex"], true),
            shared("scratch-a", &["acme"], true),
        ]
        .into(),
        ..Limits::default()
    }
}

#[test]
fn volumes_shm_and_workload_are_resolved() {
    let spec = validate(
        submission()
            .volume("models", None, None)
            .volume("scratch-a", Some("/work/out"), Some(false))
            .with(|s| {
                s.resources.memory = Some("32Gi".into());
                s.scratch = Some(ScratchInput {
                    size: "100Gi".into(),
                    mount_path: None,
                });
            })
            .0,
        &limits_with_claims(),
        "acme",
    )
    .unwrap();
    assert_eq!(spec.workload, WorkloadKind::Ml);
    // A quarter of 32Gi.
    assert_eq!(spec.shm.unwrap().to_string(), "8Gi");
    assert_eq!(spec.volumes[0].mount_path, "/mnt/models");
    assert!(spec.volumes[0].read_only);
    assert!(!spec.volumes[1].read_only);
    let scratch = spec.scratch.unwrap();
    assert_eq!(
        (scratch.size.to_string(), scratch.mount_path.as_str()),
        ("100Gi".into(), "/scratch")
    );

    let explicit = validate(
        submission().with(|s| s.shm = Some("2Gi".into())).0,
        &Limits::default(),
        "acme",
    )
    .unwrap();
    assert_eq!(explicit.shm.unwrap().to_string(), "2Gi");
    let capped = validate(
        submission()
            .with(|s| s.resources.memory = Some("512Gi".into()))
            .0,
        &Limits::default(),
        "acme",
    )
    .unwrap();
    assert_eq!(capped.shm.unwrap().to_string(), "16Gi");
    let cpu = validate(
        submission()
            .with(|s| {
                s.image = "busybox".into();
                s.command = vec!["sh".into()];
            })
            .0,
        &Limits::default(),
        "acme",
    )
    .unwrap();
    assert_eq!((cpu.workload, cpu.shm), (WorkloadKind::Cpu, None));
    let declared = validate(
        submission()
            .with(|s| s.workload = Some(WorkloadRequest::Cpu))
            .0,
        &Limits::default(),
        "acme",
    )
    .unwrap();
    assert_eq!((declared.workload, declared.shm), (WorkloadKind::Cpu, None));
}

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

fn retry_rule() -> RetryRuleInput {
    RetryRuleInput {
        action: RetryAction::Retry,
        on_exit_codes: vec![1],
        on_failure_classes: Vec::new(),
        mutate: None,
    }
}

impl Fixture {
    fn with(mut self, change: impl FnOnce(&mut Submission)) -> Self {
        change(&mut self.0);
        self
    }
    fn policy(self, change: impl FnOnce(&mut RetryPolicyInput)) -> Self {
        self.with(|s| change(s.retry_policy.get_or_insert_with(RetryPolicyInput::default)))
    }
    fn gpu(self, count: u32, class: &str) -> Self {
        self.with(|s| {
            s.resources.gpu = Some(GpuInput {
                count,
                class: class.into(),
                allow_fallback: None,
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
    fn volume(self, claim: &str, path: Option<&str>, read_only: Option<bool>) -> Self {
        self.with(|s| {
            s.volumes.push(VolumeInput {
                claim: claim.into(),
                mount_path: path.map(Into::into),
                read_only,
            });
        })
    }
    fn field_error(self) -> FieldError {
        validate(self.0, &limits_with_claims(), "acme").expect_err("should be refused")
    }
}

#[test]
fn a_plain_submission_gets_the_defaults() {
    let spec = validate(submission().0, &Limits::default(), "acme").unwrap();
    assert_eq!(spec.queue, "default");
    assert_eq!(spec.timeout_seconds, 3600);
    assert_eq!(spec.max_retries, 0);
    assert_eq!(spec.queue_ttl_seconds, None);
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
        "acme",
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
        (
            submission().with(|s| s.queue_ttl_seconds = Some(0)),
            "queue_ttl_seconds",
        ),
        (
            submission().policy(|p| p.backoff_seconds = Some(3601)),
            "retry_policy.backoff_seconds",
        ),
        (
            submission().policy(|p| {
                p.backoff_seconds = Some(30);
                p.max_backoff_seconds = Some(10);
            }),
            "retry_policy.max_backoff_seconds",
        ),
        (
            submission().policy(|p| p.max_backoff_seconds = Some(2 * 24 * 3600)),
            "retry_policy.max_backoff_seconds",
        ),
        (
            submission().policy(|p| p.rules = vec![retry_rule(); 17]),
            "retry_policy.rules",
        ),
        (
            submission().policy(|p| {
                p.rules = vec![
                    retry_rule(),
                    RetryRuleInput {
                        on_exit_codes: vec![0],
                        ..retry_rule()
                    },
                ];
            }),
            "retry_policy.rules[1].on_exit_codes",
        ),
        (
            submission().policy(|p| {
                p.rules = vec![RetryRuleInput {
                    on_exit_codes: (1..=33).collect(),
                    ..retry_rule()
                }];
            }),
            "retry_policy.rules[0].on_exit_codes",
        ),
        (
            submission().policy(|p| {
                p.rules = vec![RetryRuleInput {
                    mutate: Some(MutationInput {
                        memory_factor: Some(8.0),
                        ..MutationInput::default()
                    }),
                    ..retry_rule()
                }];
            }),
            "retry_policy.rules[0].mutate.memory_factor",
        ),
        (
            submission().policy(|p| {
                p.rules = vec![RetryRuleInput {
                    action: RetryAction::Fail,
                    mutate: Some(MutationInput::default()),
                    ..retry_rule()
                }];
            }),
            "retry_policy.rules[0].mutate",
        ),
        (
            submission().with(|s| s.queue_ttl_seconds = Some(7 * 24 * 3600 + 1)),
            "queue_ttl_seconds",
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
        (submission().with(|s| s.command = vec![]), "command"),
        (submission().with(|s| s.shm = Some("lots".into())), "shm"),
        (submission().with(|s| s.shm = Some("300Gi".into())), "shm"),
        (
            submission().volume("secret-stash", None, None),
            "volumes[0].claim",
        ),
        (
            submission().volume("datasets", None, None),
            "volumes[0].claim",
        ),
        (
            submission().volume("models", None, Some(false)),
            "volumes[0].read_only",
        ),
        (
            submission().volume("models", Some("/agent-bus/bin"), None),
            "volumes[0].mount_path",
        ),
        (
            submission().volume("models", Some("/data/../etc"), None),
            "volumes[0].mount_path",
        ),
        (
            submission().volume("models", Some("relative"), None),
            "volumes[0].mount_path",
        ),
        (
            submission().volume("models", Some("/dev/shm"), None),
            "volumes[0].mount_path",
        ),
        (
            submission().volume("models", Some("/data"), None).volume(
                "scratch-a",
                Some("/data"),
                None,
            ),
            "volumes[1].mount_path",
        ),
        (
            submission()
                .volume("models", None, None)
                .volume("models", None, None),
            "volumes[1].claim",
        ),
        (
            submission().with(|s| {
                s.scratch = Some(ScratchInput {
                    size: "2Ti".into(),
                    mount_path: None,
                });
            }),
            "scratch.size",
        ),
        (
            submission()
                .volume("models", Some("/scratch"), None)
                .with(|s| {
                    s.scratch = Some(ScratchInput {
                        size: "10Gi".into(),
                        mount_path: None,
                    });
                }),
            "scratch.mount_path",
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
    assert!(validate(with("agent-bus.io/test-exit-code").0, &limits, "acme").is_ok());
    assert_eq!(
        validate(with("agent-bus.io/task-id").0, &limits, "acme")
            .unwrap_err()
            .field,
        "annotations.agent-bus.io/task-id"
    );
    assert!(
        validate(
            with("agent-bus.io/test-exit-code").0,
            &Limits::default(),
            "acme"
        )
        .is_err()
    );
}

#[test]
fn lookalike_domains_are_not_reserved() {
    let spec = validate(
        submission().label("mykubernetes.io/team", "ml").0,
        &Limits::default(),
        "acme",
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

#[test]
fn a_queue_ttl_is_kept_within_its_bounds() {
    for ttl in [1, 60, 7 * 24 * 3600] {
        let spec = validate(
            submission().with(|s| s.queue_ttl_seconds = Some(ttl)).0,
            &Limits::default(),
            "acme",
        )
        .unwrap();
        assert_eq!(spec.queue_ttl_seconds, Some(ttl));
    }
}

#[test]
fn a_retry_policy_is_kept_as_written() {
    let spec = validate(
        submission()
            .with(|s| s.max_retries = Some(3))
            .policy(|p| {
                p.backoff_seconds = Some(5);
                p.rules = vec![
                    RetryRuleInput {
                        action: RetryAction::Fail,
                        on_exit_codes: vec![2],
                        on_failure_classes: Vec::new(),
                        mutate: None,
                    },
                    RetryRuleInput {
                        action: RetryAction::Retry,
                        on_exit_codes: Vec::new(),
                        on_failure_classes: vec![FailureClass::Oom],
                        mutate: Some(MutationInput {
                            memory_factor: Some(2.0),
                            ..MutationInput::default()
                        }),
                    },
                ];
            })
            .0,
        &Limits::default(),
        "acme",
    )
    .unwrap();
    let policy = spec.retry_policy.unwrap();
    assert_eq!(policy.backoff_seconds, Some(5));
    assert_eq!(policy.max_backoff_seconds, None);
    assert_eq!(policy.rules.len(), 2);
    assert_eq!(policy.rules[0].on_exit_codes, [2]);
    assert_eq!(
        policy.rules[1]
            .mutate
            .memory_factor
            .map(crate::task::retry::Factor::get),
        Some(2.0)
    );
    // Stored as JSON and read back, it is the same policy.
    let json = serde_json::to_value(&policy).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"backoff_seconds": 5, "rules": [
            {"action": "fail", "on_exit_codes": [2]},
            {"action": "retry", "on_failure_classes": ["oom"], "mutate": {"memory_factor": 2.0}}
        ]})
    );
    assert_eq!(serde_json::from_value::<RetryPolicy>(json).unwrap(), policy);
}

#[test]
fn secret_references_are_checked_for_syntax_and_kept_as_references() {
    use crate::task::{EnvValue, SecretRef};
    let reference = |secret: &str, key: &str| {
        EnvValue::Secret(SecretRef {
            secret: secret.into(),
            key: key.into(),
        })
    };
    let with_ref = |secret: &str, key: &str| {
        submission().with(|s| {
            s.env
                .insert("OPENAI_API_KEY".into(), reference(secret, key));
        })
    };
    let spec = validate(with_ref("openai", "token").0, &Limits::default(), "acme").unwrap();
    assert_eq!(spec.env["OPENAI_API_KEY"], reference("openai", "token"));
    for (secret, key, field) in [
        ("OpenAI", "token", "env.OPENAI_API_KEY.secret"),
        ("", "token", "env.OPENAI_API_KEY.secret"),
        ("openai", "a/b", "env.OPENAI_API_KEY.key"),
        ("openai", "..", "env.OPENAI_API_KEY.key"),
    ] {
        assert_eq!(
            with_ref(secret, key).field_error().field,
            field,
            "{secret} {key}"
        );
    }
    // The variable's name is checked the same, whatever its value.
    let bad_name = submission().with(|s| {
        s.env.insert("MY VAR".into(), reference("openai", "token"));
    });
    assert_eq!(bad_name.field_error().field, "env.MY VAR");
}
