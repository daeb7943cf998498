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
/// only), scratch-a (acme, writable), and `example.com/` labels and annotations allowed.
fn limits_with_claims() -> Limits {
    Limits {
        label_prefixes: vec!["example.com/".parse().unwrap()],
        annotation_prefixes: vec!["example.com/".parse().unwrap()],
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
            submission().policy(|p| p.max_backoff_seconds = Some(0)),
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
        (
            submission().label("example.com/team", &"x".repeat(64)),
            "labels.example.com/team",
        ),
        (submission().label("team", "ml"), "labels.team"),
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

/// Limits as the test environment sets them: `example.com/` labels and annotations, and
/// the kwok test annotations.
fn limits_with_prefixes() -> Limits {
    Limits {
        label_prefixes: vec![
            "example.com/".parse().unwrap(),
            "mykubernetes.io/".parse().unwrap(),
        ],
        annotation_prefixes: vec![
            "example.com/".parse().unwrap(),
            "agent-bus.io/test-".parse().unwrap(),
        ],
        ..Limits::default()
    }
}

#[test]
fn only_allowed_annotations_and_labels_pass() {
    let annotated = |key: &str| {
        submission().with(|s| {
            s.annotations.insert(key.into(), "3".into());
        })
    };
    let allowed = limits_with_prefixes();
    for key in ["example.com/owner", "agent-bus.io/test-exit-code"] {
        let spec = validate(annotated(key).0, &allowed, "acme").unwrap();
        assert_eq!(spec.annotations[key], "3");
    }
    let spec = validate(
        submission()
            .label("example.com/team", "ml")
            .label("mykubernetes.io/team", "ml")
            .0,
        &allowed,
        "acme",
    )
    .unwrap();
    assert_eq!(
        spec.labels.len(),
        2,
        "a lookalike of a reserved domain is not reserved"
    );

    // (key, what the refusal says) under the test environment's prefixes, then with the
    // defaults (nothing allowed).
    let refused = [
        ("owner", "without a DNS prefix"),
        ("io.kubernetes.cri-o.Devices", "without a DNS prefix"),
        ("io.kubernetes.cri-o.userns-mode", "without a DNS prefix"),
        ("k8s.v1.cni.cncf.io/networks", "not under a prefix"),
        ("sidecar.istio.io/inject", "not under a prefix"),
        ("vault.hashicorp.com/agent-inject", "not under a prefix"),
        ("kueue.x-k8s.io/priority-class", "reserved"),
        ("kueue.x-k8s.io/queue-name", "reserved"),
        ("cluster-autoscaler.kubernetes.io/safe-to-evict", "reserved"),
        ("kubernetes.io/psp", "reserved"),
        ("agent-bus.io/task-id", "reserved"),
        ("agent-bus.io/tenant", "reserved"),
        ("ml.example.com/owner", "not under a prefix"),
    ];
    for (key, says) in refused {
        for limits in [&allowed, &Limits::default()] {
            let error = validate(annotated(key).0, limits, "acme").unwrap_err();
            assert_eq!(error.field, format!("annotations.{key}"), "{error}");
            let label_error = validate(submission().label(key, "x").0, limits, "acme").unwrap_err();
            assert_eq!(label_error.field, format!("labels.{key}"), "{label_error}");
            assert!(error.message.contains(says), "{key}: {error}");
        }
    }
    // The defaults allow nothing, the test prefix included, and say so.
    for key in ["example.com/owner", "agent-bus.io/test-exit-code"] {
        let error = validate(annotated(key).0, &Limits::default(), "acme").unwrap_err();
        assert!(
            error.message.contains("allows no tenant annotations"),
            "{error}"
        );
    }
    let error = validate(
        submission().label("example.com/team", "ml").0,
        &Limits::default(),
        "acme",
    )
    .unwrap_err();
    assert_eq!(error.field, "labels.example.com/team");
    assert!(error.message.contains("allows no tenant labels"), "{error}");
}

#[test]
fn reserved_environment_variables_are_refused_by_name() {
    for name in [
        "AGENT_BUS_REPORT_TOKEN",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "CUDA_VISIBLE_DEVICES",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "LOCALDOMAIN",
        "RES_OPTIONS",
        "HOSTALIASES",
    ] {
        let error = submission().env(name, "x").field_error();
        assert_eq!(error.field, format!("env.{name}"), "{error}");
        assert!(error.message.contains("reserved"), "{error}");
    }
    let spec = validate(
        submission()
            .env("MALLOC_ARENA_MAX", "2")
            .env("NCCL_DEBUG", "INFO")
            .env("CUDA_HOME", "/usr/local/cuda")
            .0,
        &Limits::default(),
        "acme",
    )
    .unwrap();
    assert_eq!(spec.env.len(), 3);
}

#[test]
fn resources_are_bounded_per_task() {
    let limits = Limits {
        max_cpu: "8".parse().unwrap(),
        max_memory: "64Gi".parse().unwrap(),
        max_gpus: 2,
        max_shm: "32Gi".parse().unwrap(),
        ..Limits::default()
    };
    let at_the_bounds = submission()
        .with(|s| {
            s.resources.cpu = Some("8".into());
            s.resources.memory = Some("64Gi".into());
            s.shm = Some("32Gi".into());
        })
        .gpu(2, "a100");
    assert!(validate(at_the_bounds.0, &limits, "acme").is_ok());
    let cases: Vec<(Fixture, &str, &str)> = vec![
        (
            submission().with(|s| s.resources.cpu = Some("8001m".into())),
            "resources.cpu",
            "at most 8",
        ),
        (
            submission().with(|s| s.resources.memory = Some("65Gi".into())),
            "resources.memory",
            "at most 64Gi",
        ),
        (
            submission().gpu(3, "a100"),
            "resources.gpu.count",
            "between 1 and 2",
        ),
        (
            submission().with(|s| s.shm = Some("33Gi".into())),
            "shm",
            "at most 32Gi",
        ),
    ];
    for (fixture, field, says) in cases {
        let error = validate(fixture.0, &limits, "acme").unwrap_err();
        assert_eq!(error.field, field, "{error}");
        assert!(error.message.contains(says), "{error}");
    }
    // With the defaults: 100000 CPUs, 1Ti of memory and 16 GPUs are refused.
    for (fixture, field) in [
        (
            submission().with(|s| s.resources.cpu = Some("100000".into())),
            "resources.cpu",
        ),
        (
            submission().with(|s| s.resources.memory = Some("1Ti".into())),
            "resources.memory",
        ),
    ] {
        assert_eq!(fixture.field_error().field, field);
    }
    let sixteen = Limits {
        gpu_classes: [("big".to_owned(), 16)].into(),
        ..Limits::default()
    };
    let error = validate(submission().gpu(16, "big").0, &sixteen, "acme").unwrap_err();
    assert_eq!(error.field, "resources.gpu.count");
    assert!(error.message.contains("between 1 and 8"), "{error}");
}

#[test]
fn too_many_entries_are_refused() {
    let many_env = (0..129).fold(submission(), |f, i| f.env(&format!("V{i}"), "x"));
    assert_eq!(many_env.field_error().field, "env");
    let many_labels = (0..33).fold(submission(), |f, i| {
        f.label(&format!("example.com/l{i}"), "x")
    });
    assert_eq!(many_labels.field_error().field, "labels");
    let big_annotations = submission().with(|s| {
        s.annotations
            .insert("example.com/note".into(), "x".repeat(70_000));
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
fn structs_are_read_from_objects_only_never_from_arrays() {
    for body in [
        r#"["a", "b"]"#,
        r#"{"name":"a","image":"b","retry_policy":[null,null]}"#,
        r#"{"name":"a","image":"b","resources":{"gpu":[1,"a100"]}}"#,
        r#"{"name":"a","image":"b","volumes":[["data"]]}"#,
        r#"{"name":"a","image":"b","scratch":["1Gi"]}"#,
        r#"{"name":"a","image":"b","webhook":["http://x"]}"#,
        r#"{"name":"a","image":"b","retry_policy":{"rules":[["retry"]]}}"#,
    ] {
        let error = serde_json::from_str::<Submission>(body).unwrap_err();
        assert!(
            error.to_string().contains("invalid type: sequence"),
            "{body}: {error}"
        );
    }
    let submission: Submission = serde_json::from_str(
        r#"{"name":"a","image":"b","retry_policy":{"backoff_seconds":1,"rules":[{"action":"fail","mutate":{}}]}}"#,
    )
    .unwrap();
    assert_eq!(
        serde_json::from_value::<Submission>(serde_json::to_value(&submission).unwrap()).unwrap(),
        submission
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

#[test]
fn declared_queues_refuse_any_other_and_keep_the_default() {
    let limits = Limits {
        queues: ["default", "gpu", "batch"].map(str::to_owned).into(),
        ..Limits::default()
    };
    let in_queue = |queue: Option<&str>| {
        validate(
            submission().with(|s| s.queue = queue.map(str::to_owned)).0,
            &limits,
            "acme",
        )
    };
    assert_eq!(in_queue(Some("gpu")).unwrap().queue, "gpu");
    assert_eq!(in_queue(None).unwrap().queue, "default");
    let refused = in_queue(Some("gpus")).unwrap_err();
    assert_eq!(refused.field, "queue");
    assert_eq!(
        refused.message,
        "'gpus' is not a queue of this dispatcher: one of batch, default, gpu"
    );
    // Without declared queues any DNS label is a queue.
    let open = validate(
        submission().with(|s| s.queue = Some("anything".into())).0,
        &Limits::default(),
        "acme",
    );
    assert_eq!(open.unwrap().queue, "anything");
}
