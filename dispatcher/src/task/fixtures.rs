//! Fluent task fixtures for tests: `TaskFixture::new().gpus(2, "a100").obj()`.
//! Ids and times are fixed, so snapshots are stable; [`TaskFixture::submitted`] makes a
//! task as a submission would (fresh id, created now) for tests that store many.
//! Test-only: the unit tests use it as `crate::task::fixtures`, and the integration tests
//! compile this same file into their binary (`dispatcher/tests/integration/main.rs`,
//! over the public `dispatcher::task` types), so there is one fixture for both. A bad
//! fixture argument panics, which fails the test that wrote it.
#![allow(clippy::missing_panics_doc, clippy::unwrap_used)]

use std::collections::BTreeMap;

use super::{
    GpuRequest, Resources, Scratch, Spent, Task, TaskId, TaskSpec, TaskState, Timeline,
    VolumeMount, WorkloadKind,
};

#[derive(Debug, Clone)]
pub struct TaskFixture(Task);

impl Default for TaskFixture {
    fn default() -> Self {
        Self::new()
    }
}

impl TaskFixture {
    #[must_use]
    pub fn new() -> Self {
        let time = jiff::Timestamp::from_second(1_764_000_000).unwrap();
        Self(Task {
            id: TaskId("0190a5d6-7b8c-7d00-8e4f-1a2b3c4d5e6f".parse().unwrap()),
            tenant: "acme".into(),
            spec: TaskSpec {
                name: "train-resnet".into(),
                image: "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime".into(),
                command: vec!["python".into(), "train.py".into()],
                args: vec!["--epochs".into(), "3".into()],
                env: BTreeMap::new(),
                resources: Resources::default(),
                timeout_seconds: 3600,
                max_retries: 0,
                retry_policy: None,
                queue_ttl_seconds: None,
                priority: 0,
                queue: "default".into(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                workload: WorkloadKind::Cpu,
                shm: None,
                volumes: Vec::new(),
                scratch: None,
                webhook: None,
            },
            state: TaskState::Queued,
            reason: None,
            message: None,
            attempt: 1,
            gpu_class: None,
            exit_code: None,
            created_at: time,
            updated_at: time,
            timeline: Timeline {
                queued_at: Some(time),
                ..Timeline::default()
            },
            spent: Spent::default(),
            expires_at: None,
            retries: crate::task::retry::RetryCount::default(),
            next_attempt_at: None,
            avoid_nodes: Vec::new(),
        })
    }

    /// A task of `tenant` as a submission makes it: a fresh id, queued, created now (so
    /// ids and times sort as stored tasks do), with the spec of [`TaskFixture::new`].
    #[must_use]
    pub fn submitted(tenant: &str) -> Self {
        Self(Task::new(tenant, Self::new().0.spec))
    }

    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        self.0.spec.name = name.into();
        self
    }

    #[must_use]
    pub fn queue(mut self, queue: &str) -> Self {
        self.0.spec.queue = queue.into();
        self
    }

    #[must_use]
    pub fn priority(mut self, priority: i32) -> Self {
        self.0.spec.priority = priority;
        self
    }

    #[must_use]
    pub fn state(mut self, state: TaskState) -> Self {
        self.0.state = state;
        self
    }

    /// Expires at `at` if still queued.
    #[must_use]
    pub fn expires_at(mut self, at: jiff::Timestamp) -> Self {
        self.0.expires_at = Some(at);
        self
    }

    #[must_use]
    pub fn cpu(mut self, amount: &str) -> Self {
        self.0.spec.resources.cpu = Some(amount.parse().unwrap());
        self
    }

    #[must_use]
    pub fn memory(mut self, amount: &str) -> Self {
        self.0.spec.resources.memory = Some(amount.parse().unwrap());
        self
    }

    #[must_use]
    pub fn gpus(mut self, count: u32, class: &str) -> Self {
        self.0.spec.resources.gpu = Some(GpuRequest {
            count,
            class: class.into(),
            allow_fallback: true,
        });
        self.0.gpu_class = Some(class.into());
        self
    }

    /// The current attempt runs on `class` (a fallback of the requested one).
    #[must_use]
    pub fn placed_on(mut self, class: &str) -> Self {
        self.0.gpu_class = Some(class.into());
        self
    }

    #[must_use]
    pub fn workload(mut self, kind: WorkloadKind) -> Self {
        self.0.spec.workload = kind;
        self
    }

    #[must_use]
    pub fn shm(mut self, size: &str) -> Self {
        self.0.spec.shm = Some(size.parse().unwrap());
        self
    }

    #[must_use]
    pub fn volume(mut self, claim: &str, path: &str, read_only: bool) -> Self {
        self.0.spec.volumes.push(VolumeMount {
            claim: claim.into(),
            mount_path: path.into(),
            read_only,
        });
        self
    }

    #[must_use]
    pub fn scratch(mut self, size: &str) -> Self {
        self.0.spec.scratch = Some(Scratch {
            size: size.parse().unwrap(),
            mount_path: "/scratch".into(),
        });
        self
    }

    #[must_use]
    pub fn retries(mut self, max_retries: u32, policy: Option<super::retry::RetryPolicy>) -> Self {
        self.0.spec.max_retries = max_retries;
        self.0.spec.retry_policy = policy;
        self
    }

    #[must_use]
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.0.attempt = attempt;
        self
    }

    #[must_use]
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.0.spec.env.insert(name.into(), value.into());
        self
    }

    /// `name` takes its value from `key` of the tenant's secret `secret`.
    #[must_use]
    pub fn secret_env(mut self, name: &str, secret: &str, key: &str) -> Self {
        let reference = super::SecretRef {
            secret: secret.into(),
            key: key.into(),
        };
        self.0.spec.env.insert(name.into(), reference.into());
        self
    }

    #[must_use]
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0.spec.labels.insert(key.into(), value.into());
        self
    }

    #[must_use]
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0.spec.annotations.insert(key.into(), value.into());
        self
    }

    /// Its webhook: `url`, told of `events` (`terminal`, `started`, `retrying`).
    #[must_use]
    pub fn webhook(mut self, url: &str, events: &[&str]) -> Self {
        self.0.spec.webhook = Some(super::webhook::WebhookSpec {
            url: url.into(),
            events: events.iter().map(|event| event.parse().unwrap()).collect(),
        });
        self
    }

    #[must_use]
    pub fn obj(self) -> Task {
        self.0
    }
}
