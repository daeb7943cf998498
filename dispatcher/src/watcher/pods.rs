//! The pods of each task attempt, found through an index by (task id, attempt) instead of
//! a scan of every pod the watch cache holds: a sweep over every active task, or a burst
//! of watch events, costs one lookup per task, not tasks × pods.
//!
//! Invariants: the index maps an attempt to the names of pods that carried its labels;
//! the cache stays the truth (a name whose pod is gone from the cache is skipped, and
//! removed when the index is rebuilt); every pod the watch applies is indexed as it
//! arrives, and each sweep rebuilds the index from the cache, so names of pods deleted
//! while the watch was away do not pile up.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::launcher::job_spec::{LABEL_ATTEMPT, LABEL_TASK_ID};
use crate::task::TaskSummary;

/// (task id in its simple form, attempt) as the pod labels carry them.
type AttemptKey = (String, String);

/// The watch cache of pods and its index by task attempt. Cheap to clone.
#[derive(Clone)]
pub(super) struct TaskPods {
    cache: Store<Pod>,
    namespace: String,
    index: Arc<Mutex<HashMap<AttemptKey, BTreeSet<String>>>>,
}

fn key_of(pod: &Pod) -> Option<AttemptKey> {
    let labels = pod.labels();
    Some((
        labels.get(LABEL_TASK_ID)?.clone(),
        labels.get(LABEL_ATTEMPT)?.clone(),
    ))
}

impl TaskPods {
    pub(super) fn new(cache: Store<Pod>, namespace: &str) -> Self {
        Self {
            cache,
            namespace: namespace.to_owned(),
            index: Arc::default(),
        }
    }

    /// The cache, for what needs every pod (waiting until it is synced).
    pub(super) fn cache(&self) -> &Store<Pod> {
        &self.cache
    }

    /// Indexes a pod the watch just applied (or deleted: its name is skipped at lookup).
    pub(super) fn saw(&self, pod: &Pod) {
        if let Some(key) = key_of(pod) {
            let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
            index.entry(key).or_default().insert(pod.name_any());
        }
    }

    /// Builds the index again from the cache (each sweep).
    pub(super) fn reindex(&self) {
        let mut fresh: HashMap<AttemptKey, BTreeSet<String>> = HashMap::new();
        for pod in self.cache.state() {
            if let Some(key) = key_of(&pod) {
                fresh.entry(key).or_default().insert(pod.name_any());
            }
        }
        *self.index.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
    }

    /// The pods of `task`'s current attempt that the cache holds.
    pub(super) fn of(&self, task: &TaskSummary) -> Vec<Arc<Pod>> {
        let key = (task.id.simple(), task.attempt.to_string());
        let names: Vec<String> = {
            let index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
            index
                .get(&key)
                .map(|names| names.iter().cloned().collect())
                .unwrap_or_default()
        };
        names
            .iter()
            .filter_map(|name| {
                self.cache
                    .get(&ObjectRef::new(name).within(&self.namespace))
                    // A name reused by a pod of another attempt is not this attempt's.
                    .filter(|pod| key_of(pod).as_ref() == Some(&key))
            })
            .collect()
    }
}
