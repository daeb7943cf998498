//! Which queued task a delivery launches, and the re-offer of tasks a quota held.
//!
//! A queue delivery is a launch opportunity for its queue and priority band, not a promise
//! to launch the task it names: the tenant whose turn it is gets it
//! ([`crate::task::quota::fair_order`]: round-robin across tenants by last claim, skipping
//! tenants at their running quota). When that is another tenant, its first task is
//! claimed and the delivered task is enqueued again, so every queued task keeps an entry
//! (the stolen task's own entry, delivered later, finds it claimed and is dropped).
//! A delivered task whose tenant is at its running quota is claimed anyway so that the
//! claim notes it held, and the opportunity goes to the tenant due.
//!
//! A task its tenant's quota holds is noted `tenant_quota` by the claim and its entry is
//! dropped; the re-offer pass ([`Launcher::reoffer_held`], every [`REOFFER_INTERVAL`])
//! enqueues held tasks again once their tenant has room, each at most once per
//! [`REOFFER_COOLDOWN`], so a quota that stays full costs one refused claim per held task
//! and cooldown, never a hot loop. The reconciler leaves held tasks to this pass.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::Launcher;
use crate::lifecycle::{self, Claim};
use crate::queue::QueueEntry;
use crate::task::quota::{band, fair_order};
use crate::task::{Task, TaskId, TaskState};

/// How often held tasks are checked for room.
pub(super) const REOFFER_INTERVAL: Duration = Duration::from_secs(1);
/// A held task offered again is not offered again before this long.
const REOFFER_COOLDOWN: Duration = Duration::from_secs(10);

impl Launcher {
    /// Claims the task this delivery should launch: the first task of the tenant whose
    /// turn it is in the delivered entry's queue and band, or the delivered task itself.
    /// `Ok(None)`: nothing to launch (the delivered task was claimed, cancelled or held).
    pub(super) async fn claim_fairly(
        &self,
        entry: &QueueEntry,
    ) -> Result<Option<Task>, lifecycle::Error> {
        let store = self.lifecycle.store();
        // Its state and tenant only: the summary, without the spec blob (the claim below
        // returns the full task it launches).
        let Some(delivered) = store.task_summary(entry.task_id).await? else {
            return Ok(None);
        };
        if delivered.state != TaskState::Queued {
            return Ok(None);
        }
        let candidates = store
            .fair_candidates(&entry.queue, band(entry.priority))
            .await?;
        let order = fair_order(&candidates);
        if candidates
            .iter()
            .any(|c| c.tenant == delivered.tenant && c.at_quota)
        {
            // Its tenant is at its quota: the claim notes it held (or takes it, if a task
            // ended meanwhile), and the opportunity goes to the tenant due.
            if let Claim::Claimed(task) = self.lifecycle.claim(delivered.id).await? {
                return Ok(Some(*task));
            }
            if let Some(due) = order.first()
                && let Claim::Claimed(task) = self.lifecycle.claim(due.head).await?
            {
                return Ok(Some(*task));
            }
            return Ok(None);
        }
        if let Some(due) = order.first()
            && due.tenant != delivered.tenant
            && let Claim::Claimed(task) = self.lifecycle.claim(due.head).await?
        {
            let task = *task;
            tracing::debug!(task_id = %task.id, tenant = %task.tenant, instead_of = %delivered.id, "another tenant's turn");
            // The delivered task keeps an entry: it waits for its own turn.
            if let Err(error) = self.queue.enqueue(entry).await {
                tracing::warn!(task_id = %delivered.id, error = %error, "re-enqueue failed; the reconciler will enqueue the task");
            }
            return Ok(Some(task));
        }
        match self.lifecycle.claim(delivered.id).await? {
            Claim::Claimed(task) => Ok(Some(*task)),
            Claim::Held(_) | Claim::Gone => Ok(None),
        }
    }

    /// Enqueues again the tasks a quota held whose tenant has room now (not those offered
    /// within the cooldown), adding their queues to `queues`.
    pub(super) async fn reoffer_held(
        &self,
        offered: &mut HashMap<TaskId, Instant>,
        queues: &mut BTreeSet<String>,
    ) {
        let now = Instant::now();
        offered.retain(|_, at| now.duration_since(*at) < REOFFER_COOLDOWN);
        let held = match self.lifecycle.store().held_with_room().await {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(error = %error, "listing tasks held by a quota failed");
                return;
            }
        };
        for task in held {
            if offered.contains_key(&task.id) {
                continue;
            }
            queues.insert(task.spec.queue.clone());
            match self.queue.enqueue(&QueueEntry::of(&task)).await {
                Ok(()) => {
                    tracing::debug!(task_id = %task.id, tenant = %task.tenant, "offered a held task again: its tenant has room");
                    offered.insert(task.id, now);
                }
                Err(error) => {
                    tracing::warn!(task_id = %task.id, error = %error, "re-offering a held task failed");
                }
            }
        }
    }
}
