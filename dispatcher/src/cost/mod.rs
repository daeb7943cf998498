//! The cost model: what a task costs, from a price table, its requested resources and its
//! running time, plus the LLM cost its runner reports. Pure: no clock, no store.
//!
//! A task is charged for what it requested (GPUs of its class, CPU cores, memory GiB;
//! a GPU task that names no CPU or memory requests its class's defaults, as its Job does)
//! from the moment it started running (the runner's `started` report or the pod
//! running) to its final state. What it did not request is not charged: a task without a
//! CPU request costs no CPU. LLM cost is the sum of `cost_usd` over its usage reports,
//! whatever the prices here say.
//!
//! Invariants: every figure is finite and non-negative; prices are validated once, at
//! start ([`Prices::new`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::placement::GpuClasses;
pub use crate::task::Breakdown;
use crate::task::{Resources, Spent, Task, TaskSpec, TaskState, TaskSummary, Timeline};

mod budget;

pub use budget::{Budget, BudgetAction};

/// A price that is negative or not a number; names the price.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("price {name} is {value}: prices must be finite and at least 0")]
pub struct PriceError {
    pub name: String,
    pub value: f64,
}

/// Dollars per hour of each resource.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::struct_field_names)] // every price is per hour: the names say of what
pub struct Prices {
    /// Per GPU (or MIG slice) of a class, per hour.
    gpu_hour: BTreeMap<String, f64>,
    /// The classes, for the CPU and memory defaults of tasks that name none.
    classes: GpuClasses,
    cpu_core_hour: f64,
    memory_gib_hour: f64,
}

impl Default for Prices {
    /// The built-in GPU classes' list prices, and the default CPU and memory prices.
    fn default() -> Self {
        Self {
            gpu_hour: gpu_prices(&GpuClasses::default()),
            classes: GpuClasses::default(),
            cpu_core_hour: Self::DEFAULT_CPU_CORE_HOUR,
            memory_gib_hour: Self::DEFAULT_MEMORY_GIB_HOUR,
        }
    }
}

fn gpu_prices(classes: &GpuClasses) -> BTreeMap<String, f64> {
    classes
        .iter()
        .map(|class| (class.name.clone(), class.price_per_hour))
        .collect()
}

impl Prices {
    /// Dollars per CPU core-hour unless configured (also the `--price-cpu-core-hour` default).
    pub const DEFAULT_CPU_CORE_HOUR: f64 = 0.04;
    /// Dollars per GiB-hour of memory unless configured.
    pub const DEFAULT_MEMORY_GIB_HOUR: f64 = 0.005;

    /// The price table: each GPU class's `price_per_hour`, and the CPU and memory prices.
    pub fn new(
        gpu_classes: &GpuClasses,
        cpu_core_hour: f64,
        memory_gib_hour: f64,
    ) -> Result<Self, PriceError> {
        let check = |name: &str, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(value)
            } else {
                Err(PriceError {
                    name: name.to_owned(),
                    value,
                })
            }
        };
        let gpu_hour = gpu_prices(gpu_classes);
        for (class, price) in &gpu_hour {
            check(&format!("gpu_classes.{class}.price_per_hour"), *price)?;
        }
        Ok(Self {
            gpu_hour,
            classes: gpu_classes.clone(),
            cpu_core_hour: check("--price-cpu-core-hour", cpu_core_hour)?,
            memory_gib_hour: check("--price-memory-gib-hour", memory_gib_hour)?,
        })
    }

    /// What `spec` costs per hour when it runs on `gpu_class` (its current class, which a
    /// fallback may have changed). A class missing from the table costs nothing: it was
    /// removed from the configuration after the task was accepted.
    #[must_use]
    pub fn hourly(&self, spec: &TaskSpec, gpu_class: Option<&str>) -> Breakdown {
        self.hourly_for(&spec.resources, gpu_class)
    }

    /// What a task asking for `resources` costs per hour on `gpu_class` (see
    /// [`Prices::hourly`]): all the price needs of a spec, so a summary prices the same.
    #[must_use]
    pub fn hourly_for(&self, resources: &Resources, gpu_class: Option<&str>) -> Breakdown {
        let class = resources
            .gpu
            .as_ref()
            .map(|gpu| gpu_class.unwrap_or(&gpu.class));
        let gpu = resources.gpu.as_ref().map_or(0.0, |gpu| {
            let class = class.unwrap_or(&gpu.class);
            f64::from(gpu.count) * self.gpu_hour.get(class).copied().unwrap_or(0.0)
        });
        let (cpu, memory) = self
            .classes
            .effective_requests(class, resources.cpu, resources.memory);
        let cores = cpu.map_or(0.0, |cpu| cpu.millicores() as f64 / 1000.0);
        let gib = memory.map_or(0.0, |memory| memory.bytes() as f64 / GIB);
        Breakdown {
            gpu,
            cpu: cores * self.cpu_core_hour,
            memory: gib * self.memory_gib_hour,
        }
    }

    /// The most a task can cost before the LLM: its hourly price for its whole timeout.
    #[must_use]
    pub fn estimate(&self, task: &Task) -> Estimate {
        let per_hour = self.hourly(&task.spec, task.gpu_class.as_deref());
        let hours = f64::from(task.spec.timeout_seconds) / 3600.0;
        Estimate {
            per_hour_dollars: round_cents(per_hour.total()),
            max_dollars: round_cents(per_hour.total() * hours),
            basis: "price per hour x timeout_seconds; LLM usage is extra",
        }
    }

    /// What a task costs for `ran` of running time.
    #[must_use]
    pub fn for_duration(
        &self,
        spec: &TaskSpec,
        gpu_class: Option<&str>,
        ran: Duration,
    ) -> Breakdown {
        self.hourly(spec, gpu_class)
            .times(ran.as_secs_f64() / 3600.0)
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The estimate in a submit's 201.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Estimate {
    pub per_hour_dollars: f64,
    /// If the task runs until its timeout.
    pub max_dollars: f64,
    pub basis: &'static str,
}

/// A task's cost as `GET /v1/tasks/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TaskCost {
    /// Compute plus LLM, in dollars.
    pub total_dollars: f64,
    /// GPU, CPU and memory for the running time so far (final once the task is over).
    pub compute: Breakdown,
    /// Summed from the runner's usage reports.
    pub llm_dollars: f64,
    /// Seconds between running and the final state (or now).
    pub running_seconds: f64,
    pub per_hour_dollars: f64,
    /// `false` while the task runs: the figures grow.
    pub settled: bool,
}

/// The UTC periods budgets and spend are counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub const ALL: [Period; 2] = [Period::Day, Period::Month];

    /// `day` or `month`, as labels and messages say it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// `daily` or `monthly`, as budgets are named.
    #[must_use]
    pub fn adjective(self) -> &'static str {
        match self {
            Self::Day => "daily",
            Self::Month => "monthly",
        }
    }

    /// The start of the UTC day or month that holds `now` (`now` itself at the ends of
    /// time, which jiff cannot step past).
    #[must_use]
    pub fn start(self, now: jiff::Timestamp) -> jiff::Timestamp {
        let zoned = now.to_zoned(jiff::tz::TimeZone::UTC);
        let start = match self {
            Self::Day => zoned.start_of_day(),
            Self::Month => zoned.first_of_month().and_then(|d| d.start_of_day()),
        };
        start.map_or(now, |z| z.timestamp())
    }

    /// The start of the next UTC day or month: when a spent budget renews.
    #[must_use]
    pub fn next_start(self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        let zoned = now.to_zoned(jiff::tz::TimeZone::UTC);
        let next = match self {
            Self::Day => zoned.tomorrow(),
            Self::Month => zoned.last_of_month().and_then(|d| d.tomorrow()),
        };
        next.and_then(|d| d.start_of_day())
            .ok()
            .map(|z| z.timestamp())
    }
}

/// Money in reports and responses: to the cent's hundredth, so sums stay readable.
#[must_use]
pub fn round_cents(dollars: f64) -> f64 {
    // `+ 0.0` turns the -0.0 of an empty sum into 0.0.
    (dollars * 10_000.0).round() / 10_000.0 + 0.0
}

/// A tenant's spend, unfinished tasks included, for the budget periods.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spend {
    pub day_dollars: f64,
    pub month_dollars: f64,
    /// What tasks not yet finished have cost so far (inside both figures above).
    pub unfinished_dollars: f64,
}

impl Spend {
    #[must_use]
    pub fn of(&self, period: Period) -> f64 {
        match period {
            Period::Day => self.day_dollars,
            Period::Month => self.month_dollars,
        }
    }
}

/// What a tenant's spend in the current day and month is made of, as the store reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendParts {
    /// The settled cost of its tasks finished this UTC day.
    pub finished_day_dollars: f64,
    /// The same for this UTC month.
    pub finished_month_dollars: f64,
    /// Its tasks not finished that have cost something (started, or reported LLM cost).
    pub unfinished: Vec<Task>,
}

impl Prices {
    /// The compute cost a task that ends at `at` settles at: its price for the time since
    /// it started running; nothing if it never ran.
    #[must_use]
    pub fn settle(&self, task: &Task, at: jiff::Timestamp) -> Breakdown {
        task.timeline
            .started_at
            .map_or_else(Breakdown::default, |start| {
                let ran = Duration::from_millis(
                    u64::try_from(at.as_millisecond() - start.as_millisecond()).unwrap_or_default(),
                );
                self.for_duration(&task.spec, task.gpu_class.as_deref(), ran)
            })
    }

    /// A tenant's spend at `now`: what its finished tasks cost, plus what its unfinished
    /// ones have cost so far (counted in both periods).
    #[must_use]
    pub fn spend(&self, parts: &SpendParts, now: jiff::Timestamp) -> Spend {
        let unfinished: f64 = parts
            .unfinished
            .iter()
            .map(|task| TaskCost::of(task, self, now).total_dollars)
            .sum();
        Spend {
            day_dollars: parts.finished_day_dollars + unfinished,
            month_dollars: parts.finished_month_dollars + unfinished,
            unfinished_dollars: unfinished,
        }
    }
}

impl TaskCost {
    /// The cost of `task`: `compute` is its recorded compute cost when it is over, else
    /// the cost of its running time up to `now`.
    #[must_use]
    pub fn of(task: &Task, prices: &Prices, now: jiff::Timestamp) -> Self {
        let per_hour = prices.hourly(&task.spec, task.gpu_class.as_deref());
        Self::priced(per_hour, &task.timeline, &task.spent, task.state, now)
    }

    /// The same for a task's summary (a list page's item), which holds all the cost needs.
    #[must_use]
    pub fn of_summary(task: &TaskSummary, prices: &Prices, now: jiff::Timestamp) -> Self {
        let per_hour = prices.hourly_for(&task.resources, task.gpu_class.as_deref());
        Self::priced(per_hour, &task.timeline, &task.spent, task.state, now)
    }

    fn priced(
        per_hour: Breakdown,
        timeline: &Timeline,
        spent: &Spent,
        state: TaskState,
        now: jiff::Timestamp,
    ) -> Self {
        let end = timeline.finished_at.unwrap_or(now);
        let running_seconds = timeline.started_at.map_or(0.0, |start| {
            (end.as_millisecond() - start.as_millisecond()).max(0) as f64 / 1000.0
        });
        // Once over, the settled cost covers every attempt; before, the earlier attempts'
        // cost plus the current one's so far.
        let compute = spent.compute.unwrap_or_else(|| {
            spent
                .earlier_attempts
                .plus(&per_hour.times(running_seconds / 3600.0))
        });
        let compute = Breakdown {
            gpu: round_cents(compute.gpu),
            cpu: round_cents(compute.cpu),
            memory: round_cents(compute.memory),
        };
        Self {
            total_dollars: round_cents(compute.total() + spent.llm_dollars),
            compute,
            llm_dollars: round_cents(spent.llm_dollars),
            running_seconds,
            per_hour_dollars: round_cents(per_hour.total()),
            settled: state.is_terminal(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskState;
    use crate::task::fixtures::TaskFixture;

    fn gpu_task(count: u32, class: &str) -> Task {
        TaskFixture::new()
            .gpus(count, class)
            .cpu("8")
            .memory("64Gi")
            .placed_on(class)
            .obj()
    }

    #[test]
    fn an_hour_of_eight_a100s_costs_their_list_price_plus_cpu_and_memory() {
        let prices = Prices::default();
        let task = gpu_task(8, "a100");
        let hourly = prices.hourly(&task.spec, task.gpu_class.as_deref());
        assert!((hourly.gpu - 8.0 * 3.67).abs() < 1e-9, "{hourly:?}");
        assert!((hourly.cpu - 8.0 * 0.04).abs() < 1e-9);
        assert!((hourly.memory - 64.0 * 0.005).abs() < 1e-9);
        let half_hour = prices.for_duration(&task.spec, Some("a100"), Duration::from_mins(30));
        assert!((half_hour.total() - hourly.total() / 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_fallen_back_task_pays_the_price_of_the_class_it_runs_on() {
        let prices = Prices::default();
        let mut task = gpu_task(1, "h100");
        task.gpu_class = Some("a100".to_owned());
        let hourly = prices.hourly(&task.spec, task.gpu_class.as_deref());
        assert!((hourly.gpu - 3.67).abs() < 1e-9);
    }

    #[test]
    fn a_gpu_task_without_cpu_or_memory_pays_for_its_classs_defaults() {
        let prices = Prices::default();
        // The built-in classes' defaults: 4 cores and 8Gi, what its Job requests.
        let task = TaskFixture::new().gpus(1, "a100").obj();
        let hourly = prices.hourly(&task.spec, task.gpu_class.as_deref());
        assert!((hourly.cpu - 4.0 * 0.04).abs() < 1e-9, "{hourly:?}");
        assert!((hourly.memory - 8.0 * 0.005).abs() < 1e-9, "{hourly:?}");
        let mut estimated = task.clone();
        estimated.spec.timeout_seconds = 3600;
        let estimate = prices.estimate(&estimated);
        assert!((estimate.per_hour_dollars - round_cents(3.67 + 0.16 + 0.04)).abs() < 1e-9);
        // A CPU task that names none costs no CPU or memory, as before.
        let cpu_only = TaskFixture::new().obj();
        let hourly = prices.hourly(&cpu_only.spec, None);
        assert!(hourly.cpu.abs() < 1e-12 && hourly.memory.abs() < 1e-12);
    }

    #[test]
    fn the_estimate_is_the_hourly_price_for_the_whole_timeout() {
        let prices = Prices::default();
        let mut task = gpu_task(1, "v100");
        task.spec.timeout_seconds = 7200;
        let estimate = prices.estimate(&task);
        assert!((estimate.max_dollars - round_cents(2.0 * estimate.per_hour_dollars)).abs() < 1e-3);
    }

    #[test]
    fn a_running_task_costs_its_time_so_far_and_a_finished_one_its_record() {
        let prices = Prices::default();
        let mut task = gpu_task(2, "v100");
        let start = jiff::Timestamp::from_second(1_000_000).unwrap_or_default();
        task.timeline.started_at = Some(start);
        task.state = TaskState::Running;
        task.spent.llm_dollars = 0.25;
        let now = start + jiff::SignedDuration::from_secs(3600);
        let cost = TaskCost::of(&task, &prices, now);
        assert!(!cost.settled);
        assert!((cost.running_seconds - 3600.0).abs() < 1e-9);
        assert!((cost.compute.gpu - 2.0 * 2.48).abs() < 1e-9);
        assert!((cost.total_dollars - round_cents(cost.compute.total() + 0.25)).abs() < 1e-9);

        task.state = TaskState::Succeeded;
        task.timeline.finished_at = Some(now);
        task.spent.compute = Some(Breakdown {
            gpu: 1.0,
            cpu: 0.5,
            memory: 0.25,
        });
        let cost = TaskCost::of(&task, &prices, now + jiff::SignedDuration::from_secs(99));
        assert!(cost.settled);
        assert!((cost.total_dollars - 2.0).abs() < 1e-9, "{cost:?}");
    }

    #[test]
    fn periods_start_and_renew_at_utc_midnight() {
        let now: jiff::Timestamp = "2026-11-30T13:45:00Z".parse().unwrap_or_default();
        let at = |text: &str| text.parse::<jiff::Timestamp>().ok();
        assert_eq!(Some(Period::Day.start(now)), at("2026-11-30T00:00:00Z"));
        assert_eq!(Some(Period::Month.start(now)), at("2026-11-01T00:00:00Z"));
        assert_eq!(Period::Day.next_start(now), at("2026-12-01T00:00:00Z"));
        assert_eq!(Period::Month.next_start(now), at("2026-12-01T00:00:00Z"));
        let mid_month: jiff::Timestamp = "2026-02-10T00:00:00Z".parse().unwrap_or_default();
        assert_eq!(
            Period::Day.next_start(mid_month),
            at("2026-02-11T00:00:00Z")
        );
        assert_eq!(
            Period::Month.next_start(mid_month),
            at("2026-03-01T00:00:00Z")
        );
    }

    #[test]
    fn bad_prices_name_the_price() {
        let error = Prices::new(&GpuClasses::default(), -1.0, 0.0).err();
        assert_eq!(
            error.map(|e| e.to_string()),
            Some(
                "price --price-cpu-core-hour is -1: prices must be finite and at least 0"
                    .to_owned()
            )
        );
    }
}
