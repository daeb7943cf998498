//! The limits a submission is checked against, set by operators in configuration, and
//! the rule that sizes `/dev/shm` for ML and CV work.

use std::collections::{BTreeMap, BTreeSet};

use super::KeyPrefix;
use crate::placement::{GpuClasses, SharedClaim};
use crate::task::webhook::Destinations;
use crate::task::{Cpu, Memory};

/// The longest queue TTL a task or a tenant default may ask for: a week.
pub const MAX_QUEUE_TTL_SECONDS: u32 = 7 * 24 * 3600;

/// The limits a submission is checked against; operators set them in configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub default_timeout_seconds: u32,
    pub max_timeout_seconds: u32,
    pub max_retries: u32,
    /// The longest queue TTL a task may ask for.
    pub max_queue_ttl_seconds: u32,
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
    /// Label key prefixes tenants may use (none by default: every label is refused).
    pub label_prefixes: Vec<KeyPrefix>,
    /// Annotation key prefixes tenants may use (none by default).
    pub annotation_prefixes: Vec<KeyPrefix>,
    /// The most CPU one task may request.
    pub max_cpu: Cpu,
    /// The most memory one task may request.
    pub max_memory: Memory,
    /// The most GPUs one task may request, whatever its class (a class's nodes may hold
    /// fewer, which is checked too).
    pub max_gpus: u32,
    /// Shared claims by name, with the tenants allowed to mount them.
    pub volume_claims: BTreeMap<String, SharedClaim>,
    pub max_volumes: usize,
    pub max_scratch: Memory,
    /// The largest `/dev/shm` one task may ask for (memory-backed: it counts against the
    /// pod's memory, so it is at most [`Limits::max_memory`]).
    pub max_shm: Memory,
    pub shm_rule: ShmRule,
    /// Where webhooks may point (`--webhook-allowed-hosts`).
    pub webhook_destinations: Destinations,
    /// The queues tasks may name (`--queues`, with `default` always among them); empty:
    /// any queue name. Each queue is three Redis streams every launcher reads, so an
    /// operator who declares them bounds that work whatever tenants submit.
    pub queues: BTreeSet<String>,
}

/// How big `/dev/shm` is for an ML or CV task that does not say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShmRule {
    /// This share of the memory request…
    pub fraction: f64,
    /// …but at most this much…
    pub cap: Memory,
    /// …and this much when the task requests no memory.
    pub without_memory_request: Memory,
}

impl Default for ShmRule {
    fn default() -> Self {
        Self::DEFAULT
    }
}

const fn gib(n: u64) -> Memory {
    Memory::from_gib(n)
}

impl ShmRule {
    /// A quarter of the memory request, at most 16Gi, 1Gi without a memory request (also
    /// the defaults of the `--shm-*` flags).
    pub const DEFAULT: Self = Self {
        fraction: 0.25,
        cap: gib(16),
        without_memory_request: gib(1),
    };

    /// The shm size of a task of this kind with this memory request (`None`: keep the
    /// runtime default). Rounded down to whole MiB.
    #[must_use]
    pub fn size(&self, memory: Option<Memory>) -> Memory {
        const MIB: u64 = 1024 * 1024;
        let wanted = match memory {
            Some(memory) => (memory.bytes() as f64 * self.fraction) as u64,
            None => self.without_memory_request.bytes(),
        };
        let bytes = (wanted.min(self.cap.bytes()) / MIB).max(1) * MIB;
        Memory::from_bytes(bytes).unwrap_or(self.without_memory_request)
    }
}

impl Limits {
    /// The defaults of the per-task maxima (and of their `--max-task-*` flags), sized for
    /// one large node: 64 cores and 512Gi hold the biggest single task of a common 8-GPU
    /// server (an 8xA100 fine-tune asks for about 32 cores and 256Gi), and no node holds
    /// more than 8 GPUs. Anything larger could never be scheduled and would sit
    /// `launched` until its timeout; an operator with larger nodes raises them.
    pub const DEFAULT_MAX_CPU: Cpu = Cpu::from_cores(64);
    pub const DEFAULT_MAX_MEMORY: Memory = gib(512);
    pub const DEFAULT_MAX_GPUS: u32 = 8;
    /// Half the memory maximum: shm is memory the task's processes share.
    pub const DEFAULT_MAX_SHM: Memory = gib(256);
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_timeout_seconds: 3600,
            max_timeout_seconds: 7 * 24 * 3600,
            max_retries: 10,
            max_queue_ttl_seconds: MAX_QUEUE_TTL_SECONDS,
            max_env_entries: 128,
            max_env_value_bytes: 32 * 1024,
            max_command_entries: 256,
            max_argument_bytes: 64 * 1024,
            max_labels: 32,
            max_annotations_bytes: 64 * 1024,
            max_priority: 1000,
            gpu_classes: GpuClasses::default().capacities(),
            label_prefixes: Vec::new(),
            annotation_prefixes: Vec::new(),
            max_cpu: Limits::DEFAULT_MAX_CPU,
            max_memory: Limits::DEFAULT_MAX_MEMORY,
            max_gpus: Limits::DEFAULT_MAX_GPUS,
            volume_claims: BTreeMap::new(),
            max_volumes: 8,
            max_scratch: gib(1024),
            max_shm: Limits::DEFAULT_MAX_SHM,
            shm_rule: ShmRule::default(),
            webhook_destinations: Destinations::default(),
            queues: BTreeSet::new(),
        }
    }
}
