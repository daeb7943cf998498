//! Admission and fairness, as pure decisions: whether a tenant's quota on running work
//! admits one more task ([`admit`]), which tenant a launcher serves next within a priority
//! band ([`fair_order`]), and what a queued task is told about its wait
//! ([`QueuePosition`], [`estimated_start`]). The store gathers the facts (in the claim's
//! transaction for [`admit`]); these functions decide.
//!
//! **Quotas.** A tenant may limit how many of its tasks are active (launching, launched or
//! running: the states that hold a Job or a process) and how many GPUs of each class they
//! hold. A task over quota is not refused: it stays `queued` with reason `tenant_quota`.
//!
//! **Fairness: round-robin across tenants, equal weights.** Within a queue and a priority
//! band (the queue's bands: priority > 0, = 0, < 0), the next task comes from the tenant
//! whose last claim is oldest (a tenant never claimed goes first), skipping tenants at
//! their running quota; within a tenant, higher priority first, then first in, first out.
//! The "last claimed" time is a column of the tenant written by every claim, so the
//! rotation is shared by every launcher replica and survives restarts, and needs no
//! capacity figures (dominant-resource fairness would need the cluster's GPUs per class).
//! One tenant's backlog of 10,000 therefore delays another tenant's single task by at
//! most one claim per other tenant with work in the band.
//!
//! **Queue position.** 1 is next. For a task that is the `k`-th of its tenant in its band:
//! every queued task of a higher band of the queue, its tenant's `k - 1` tasks before it,
//! and, from each other tenant, at most `k` tasks (one per round of the rotation) come
//! first. Counting them costs at most the position itself (indexed counts with a LIMIT).

use std::collections::BTreeMap;
use std::fmt;

use super::TaskId;

/// A tenant's limits on running work; `None` and missing classes mean no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantQuota {
    /// Tasks launching, launched or running at once.
    pub max_running: Option<u32>,
    /// GPUs those tasks hold, by GPU class.
    pub max_gpus: BTreeMap<String, u32>,
}

impl TenantQuota {
    /// Whether any limit is set.
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.max_running.is_some() || !self.max_gpus.is_empty()
    }
}

impl fmt::Display for TenantQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.is_set() {
            return f.write_str("no quota");
        }
        let mut parts = Vec::new();
        if let Some(max) = self.max_running {
            parts.push(format!("max-running={max}"));
        }
        for (class, max) in &self.max_gpus {
            parts.push(format!("max-gpus {class}={max}"));
        }
        f.write_str(&parts.join(" "))
    }
}

/// What a tenant's active tasks hold now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub running: u32,
    /// GPUs held, by class (only the class being asked for need be filled in).
    pub gpus: BTreeMap<String, u32>,
}

/// What one more task would add: a slot, and its GPUs of its current class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ask {
    pub gpus: Option<(String, u32)>,
}

/// Why a quota does not admit a task, worded for the task's `message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverQuota {
    /// An operator disabled the tenant: none of its tasks start until it is enabled.
    #[error("tenant '{tenant}' is disabled; its tasks start when an operator enables it")]
    Disabled { tenant: String },
    #[error(
        "tenant '{tenant}' runs {running} of its {max} tasks allowed at once; it starts when one ends"
    )]
    Running {
        tenant: String,
        running: u32,
        max: u32,
    },
    #[error(
        "tenant '{tenant}' holds {held} of its {max} {class} GPUs and this task needs {asked}; it starts when enough are released"
    )]
    Gpus {
        tenant: String,
        class: String,
        held: u32,
        asked: u32,
        max: u32,
    },
}

/// Whether `quota` admits a task asking `ask` while `usage` is active.
pub fn admit(tenant: &str, quota: &TenantQuota, usage: &Usage, ask: &Ask) -> Result<(), OverQuota> {
    if let Some(max) = quota.max_running
        && usage.running >= max
    {
        return Err(OverQuota::Running {
            tenant: tenant.to_owned(),
            running: usage.running,
            max,
        });
    }
    if let Some((class, asked)) = &ask.gpus
        && let Some(&max) = quota.max_gpus.get(class)
    {
        let held = usage.gpus.get(class).copied().unwrap_or(0);
        if held.saturating_add(*asked) > max {
            return Err(OverQuota::Gpus {
                tenant: tenant.to_owned(),
                class: class.clone(),
                held,
                asked: *asked,
                max,
            });
        }
    }
    Ok(())
}

/// Which of a tenant's `held` tasks (their asks, in dispatch order) its quota admits now,
/// one after the other from `usage`: each admitted task counts towards the next. A task
/// refused for its GPUs is passed over (a later one of another class may fit); once the
/// running limit is reached, none is. Indices into `held`.
#[must_use]
pub fn admissible(tenant: &str, quota: &TenantQuota, usage: &Usage, held: &[Ask]) -> Vec<usize> {
    let mut usage = usage.clone();
    let mut admitted = Vec::new();
    for (index, ask) in held.iter().enumerate() {
        match admit(tenant, quota, &usage, ask) {
            Ok(()) => {
                admitted.push(index);
                usage.running = usage.running.saturating_add(1);
                if let Some((class, count)) = &ask.gpus {
                    let held = usage.gpus.entry(class.clone()).or_default();
                    *held = held.saturating_add(*count);
                }
            }
            Err(OverQuota::Running { .. } | OverQuota::Disabled { .. }) => break,
            Err(OverQuota::Gpus { .. }) => {}
        }
    }
    admitted
}

/// The priority band of a queue a priority falls in, as an inclusive range: the queue
/// orders bands (high > 0, normal = 0, low < 0) and is first in, first out inside one.
#[must_use]
pub fn band(priority: i32) -> (i32, i32) {
    match priority {
        p if p > 0 => (1, i32::MAX),
        0 => (0, 0),
        _ => (i32::MIN, -1),
    }
}

/// One tenant with queued work in a band, as the fair choice sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub tenant: String,
    /// Its first task in dispatch order.
    pub head: TaskId,
    /// When one of its tasks was last claimed; `None`: never.
    pub last_claimed_at: Option<i64>,
    /// Whether its running quota is full (it cannot take a task now).
    pub at_quota: bool,
}

/// The tenants a launcher should serve, best first: tenants at their running quota are
/// left out; the one claimed longest ago (never claimed first) goes first; a tie goes to
/// the oldest head task.
#[must_use]
pub fn fair_order(candidates: &[Candidate]) -> Vec<&Candidate> {
    let mut order: Vec<&Candidate> = candidates.iter().filter(|c| !c.at_quota).collect();
    order.sort_by_key(|c| (c.last_claimed_at.is_some(), c.last_claimed_at, c.head));
    order
}

/// The counts behind a queued task's position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueuePosition {
    /// Queued tasks of higher bands of the queue.
    pub higher_bands: u64,
    /// Its tenant's queued tasks before it in its band (`k - 1`).
    pub own_before: u64,
    /// Summed over the other tenants: their queued tasks in the band, at most `k` each.
    pub others: u64,
}

impl QueuePosition {
    /// 1 for the next task to be launched.
    #[must_use]
    pub fn position(&self) -> u64 {
        1 + self.higher_bands + self.own_before + self.others
    }
}

/// When a task with `ahead` tasks before it may start, if launches go on at the rate of
/// the last `window` (`launched` launches in it); `None` when nothing was launched in the
/// window (no rate to go by).
#[must_use]
pub fn estimated_start(
    now: jiff::Timestamp,
    ahead: u64,
    launched: u64,
    window: std::time::Duration,
) -> Option<jiff::Timestamp> {
    if launched == 0 || window.is_zero() {
        return None;
    }
    // Each launch frees one place in line: `ahead` places take `ahead / rate`.
    let seconds = window.as_secs_f64() * ahead as f64 / launched as f64;
    let wait = jiff::SignedDuration::try_from_secs_f64(seconds).ok()?;
    now.checked_add(wait).ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Ask, Candidate, OverQuota, QueuePosition, TenantQuota, Usage, admit, band};
    use super::{estimated_start, fair_order};
    use crate::task::TaskId;

    fn quota(running: Option<u32>, gpus: &[(&str, u32)]) -> TenantQuota {
        TenantQuota {
            max_running: running,
            max_gpus: gpus.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect(),
        }
    }

    fn usage(running: u32, gpus: &[(&str, u32)]) -> Usage {
        Usage {
            running,
            gpus: gpus.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect(),
        }
    }

    fn gpus(class: &str, count: u32) -> Ask {
        Ask {
            gpus: Some((class.to_owned(), count)),
        }
    }

    #[test]
    fn the_quota_admits_up_to_its_limits() {
        let cpu = Ask::default();
        let cases: [(TenantQuota, Usage, Ask, bool); 10] = [
            (TenantQuota::default(), usage(1000, &[]), cpu.clone(), true),
            (quota(Some(2), &[]), usage(1, &[]), cpu.clone(), true),
            (quota(Some(2), &[]), usage(2, &[]), cpu.clone(), false),
            (quota(Some(0), &[]), usage(0, &[]), cpu.clone(), false),
            (
                quota(None, &[("a100", 4)]),
                usage(9, &[("a100", 2)]),
                gpus("a100", 2),
                true,
            ),
            (
                quota(None, &[("a100", 4)]),
                usage(9, &[("a100", 3)]),
                gpus("a100", 2),
                false,
            ),
            // A class without a limit, and a CPU task, pass a GPU quota.
            (
                quota(None, &[("a100", 0)]),
                usage(9, &[]),
                gpus("h100", 8),
                true,
            ),
            (
                quota(None, &[("a100", 0)]),
                usage(9, &[("a100", 5)]),
                cpu.clone(),
                true,
            ),
            // A task larger than the whole quota waits (its message says why).
            (
                quota(None, &[("a100", 4)]),
                usage(0, &[]),
                gpus("a100", 8),
                false,
            ),
            (
                quota(Some(3), &[("a100", 4)]),
                usage(3, &[]),
                gpus("a100", 1),
                false,
            ),
        ];
        for (quota, usage, ask, admitted) in cases {
            assert_eq!(
                admit("acme", &quota, &usage, &ask).is_ok(),
                admitted,
                "{quota} {usage:?} {ask:?}"
            );
        }
    }

    #[test]
    fn a_refusal_says_which_limit_and_what_it_waits_for() {
        let running = admit(
            "acme",
            &quota(Some(1), &[]),
            &usage(1, &[]),
            &Ask::default(),
        );
        assert_eq!(
            running.unwrap_err().to_string(),
            "tenant 'acme' runs 1 of its 1 tasks allowed at once; it starts when one ends"
        );
        let gpu = admit(
            "acme",
            &quota(None, &[("h100", 2)]),
            &usage(0, &[("h100", 1)]),
            &gpus("h100", 2),
        );
        assert!(matches!(
            gpu,
            Err(OverQuota::Gpus {
                held: 1,
                asked: 2,
                max: 2,
                ..
            })
        ));
        assert_eq!(
            quota(Some(2), &[("a100", 4), ("h100", 2)]).to_string(),
            "max-running=2 max-gpus a100=4 max-gpus h100=2"
        );
        assert_eq!(TenantQuota::default().to_string(), "no quota");
    }

    #[test]
    fn held_tasks_are_admitted_one_after_the_other() {
        let cpu = Ask::default();
        // Two free slots: the first two.
        assert_eq!(
            super::admissible(
                "acme",
                &quota(Some(3), &[]),
                &usage(1, &[]),
                &[cpu.clone(), cpu.clone(), cpu.clone()]
            ),
            [0, 1]
        );
        // 3 of 4 a100 held: the 2-GPU task waits, the 1-GPU task and the CPU task fit, a
        // second 1-GPU task no longer does.
        assert_eq!(
            super::admissible(
                "acme",
                &quota(None, &[("a100", 4)]),
                &usage(3, &[("a100", 2)]),
                &[
                    gpus("a100", 3),
                    gpus("a100", 1),
                    cpu.clone(),
                    gpus("a100", 2)
                ]
            ),
            [1, 2]
        );
        // No room at all.
        assert!(super::admissible("acme", &quota(Some(1), &[]), &usage(1, &[]), &[cpu]).is_empty());
    }

    #[test]
    fn bands_follow_the_queue() {
        assert_eq!(band(9), (1, i32::MAX));
        assert_eq!(band(1), (1, i32::MAX));
        assert_eq!(band(0), (0, 0));
        assert_eq!(band(-1), (i32::MIN, -1));
    }

    fn candidate(tenant: &str, head: TaskId, last: Option<i64>, at_quota: bool) -> Candidate {
        Candidate {
            tenant: tenant.to_owned(),
            head,
            last_claimed_at: last,
            at_quota,
        }
    }

    fn order(candidates: &[Candidate]) -> Vec<&str> {
        fair_order(candidates)
            .into_iter()
            .map(|c| c.tenant.as_str())
            .collect()
    }

    #[test]
    fn the_tenant_claimed_longest_ago_goes_first() {
        let (old, new) = (TaskId::new(), TaskId::new());
        // A's backlog is older, but A was just served: B's single task goes next.
        assert_eq!(
            order(&[
                candidate("a", old, Some(2_000), false),
                candidate("b", new, Some(1_000), false),
            ]),
            ["b", "a"]
        );
        // A tenant never served goes before any that was.
        assert_eq!(
            order(&[
                candidate("a", old, Some(1), false),
                candidate("b", new, None, false),
            ]),
            ["b", "a"]
        );
        // A tie goes to the oldest head.
        assert_eq!(
            order(&[
                candidate("b", new, None, false),
                candidate("a", old, None, false),
            ]),
            ["a", "b"]
        );
        // A tenant at its quota is not served at all.
        assert_eq!(
            order(&[
                candidate("a", old, None, true),
                candidate("b", new, Some(5), false),
            ]),
            ["b"]
        );
    }

    /// Round-robin by simulation: A with 300 queued, B with 1, C with 2, one claim at a
    /// time (each claim stamps its tenant): B's task is among the first three.
    #[test]
    fn a_backlog_never_starves_a_single_task() {
        let mut queued: Vec<(String, Vec<TaskId>)> = vec![
            ("a".to_owned(), (0..300).map(|_| TaskId::new()).collect()),
            ("b".to_owned(), vec![TaskId::new()]),
            ("c".to_owned(), vec![TaskId::new(), TaskId::new()]),
        ];
        let mut last = std::collections::BTreeMap::<String, i64>::new();
        // A was served just before B and C submitted.
        last.insert("a".to_owned(), 0);
        let mut launched = Vec::new();
        for clock in 1..=303 {
            let candidates: Vec<Candidate> = queued
                .iter()
                .filter(|(_, tasks)| !tasks.is_empty())
                .map(|(tenant, tasks)| {
                    candidate(tenant, tasks[0], last.get(tenant).copied(), false)
                })
                .collect();
            let Some(next) = fair_order(&candidates).first().map(|c| c.tenant.clone()) else {
                break;
            };
            last.insert(next.clone(), clock);
            let tasks = &mut queued.iter_mut().find(|(t, _)| *t == next).unwrap().1;
            tasks.remove(0);
            launched.push(next);
        }
        assert_eq!(launched.len(), 303);
        let b = launched.iter().position(|t| t == "b").unwrap();
        assert!(b < 3, "{launched:?}");
        assert_eq!(&launched[..5], ["b", "c", "a", "c", "a"]);
    }

    #[test]
    fn the_position_counts_what_comes_first() {
        assert_eq!(QueuePosition::default().position(), 1);
        let position = QueuePosition {
            higher_bands: 2,
            own_before: 3,
            others: 4,
        };
        assert_eq!(position.position(), 10);
    }

    #[test]
    fn the_start_is_estimated_from_the_recent_launch_rate() {
        let now = jiff::Timestamp::from_second(1_000_000).unwrap();
        let window = Duration::from_mins(10);
        assert_eq!(estimated_start(now, 5, 0, window), None);
        assert_eq!(estimated_start(now, 5, 10, Duration::ZERO), None);
        // 60 launches in 10 minutes: one every 10 s; 5 ahead: in 50 s.
        assert_eq!(
            estimated_start(now, 5, 60, window),
            Some(jiff::Timestamp::from_second(1_000_050).unwrap())
        );
        assert_eq!(estimated_start(now, 0, 60, window), Some(now));
    }
}
