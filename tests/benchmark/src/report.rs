//! What a run prints: the markdown of each part (docs/BENCHMARKS.md embeds it), the
//! goals of issue 15 against the measured figures (met or missed, and for a miss the
//! stage that holds it), and the one-line JSON summary.

use std::fmt::Write as _;

use crate::Sizes;
use crate::capacity::{ApiStep, Million, Stubbed};
use crate::latency::{RateStep, Ratio};
use crate::load::ms;
use crate::stages::{STAGES, mean_of};

/// Everything a run measured.
#[derive(Debug)]
pub(crate) struct Results {
    pub(crate) steps: Vec<RateStep>,
    pub(crate) ratio: Ratio,
    pub(crate) api: Vec<ApiStep>,
    pub(crate) stubbed: Stubbed,
    pub(crate) idle_rss: f64,
    pub(crate) rss_active: f64,
    pub(crate) active_jobs: usize,
    pub(crate) million: Option<Million>,
}

impl Results {
    fn step_at(&self, rate: u32) -> Option<&RateStep> {
        self.steps.iter().find(|s| s.rate == rate)
    }

    /// The highest rate that did not saturate.
    fn sustained(&self) -> Option<u32> {
        self.steps
            .iter()
            .filter(|s| !s.saturated)
            .map(|s| s.rate)
            .max()
    }

    fn api_at(&self, backend: &str, rate: u32) -> Option<&ApiStep> {
        self.api
            .iter()
            .find(|s| s.backend == backend && s.rate == rate)
    }
}

fn mark(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

/// Operation means of a step, as `name mean (count)` cells.
fn means_line(step: &RateStep) -> String {
    let wanted = [
        ("store insert_task", "operation=\"insert_task\""),
        ("queue enqueue", "operation=\"enqueue\""),
        ("queue ack", "operation=\"ack\""),
        (
            "Kubernetes create jobs",
            "verb=\"create\",resource=\"jobs\"",
        ),
    ];
    wanted
        .iter()
        .map(|(label, needle)| {
            format!(
                "{label} {}",
                ms(mean_of(&step.means, needle).unwrap_or(f64::NAN))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn markdown(r: &Results, sizes: &Sizes) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## (a) Open-loop submit→Job latency by arrival rate\n");
    let _ = writeln!(
        out,
        "Each rate runs {:.0} s against a fresh dispatcher (all roles, PostgreSQL, Redis, `--executor kubernetes`); \
         a request unanswered after {:.0} s counts as not accepted. Each stage is the time from the request's send to \
         that moment, p50 / p99 over the accepted tasks: *HTTP accepted* is the bench's clock, *task made* and the two \
         events are the dispatcher's rows (unix ms), *Job seen* is a watch in the bench. *Stored* and *enqueued* happen \
         between *task made* and *HTTP accepted* and no row records them per task; nor does *create sent*, which lies \
         between *claimed* and *create answered*: for those the means of the store insert, the Redis enqueue and the \
         Kubernetes create over the step come from `/metrics` (last column).\n",
        sizes.step.as_secs_f64(),
        sizes.request_timeout.as_secs_f64()
    );
    let _ = write!(out, "| rate/s | accepted | Jobs seen/s |");
    for stage in STAGES {
        let _ = write!(out, " {stage} p50 / p99 |");
    }
    let _ = writeln!(out, " means from /metrics |");
    let _ = writeln!(out, "|{}", " --- |".repeat(STAGES.len() + 4));
    for step in &r.steps {
        let _ = write!(
            out,
            "| {}{} | {}/{} ({} 503) | {:.0} |",
            step.rate,
            if step.saturated { " (saturated)" } else { "" },
            step.outcome.accepted.len(),
            step.outcome.sent,
            step.outcome.overloaded,
            step.achieved
        );
        for (p50, p99) in step.breakdown.p50.iter().zip(&step.breakdown.p99) {
            let _ = write!(out, " {} / {} |", ms(*p50), ms(*p99));
        }
        let _ = writeln!(out, " {} |", means_line(step));
    }

    let _ = writeln!(
        out,
        "\n## (b) Saturated throughput against kube-rs direct\n"
    );
    let _ = writeln!(
        out,
        "{} tasks per run, {} in flight; each round creates them with `Api::<Job>::create` (direct) and then \
         submits them to a fresh dispatcher (agent-bus); throughput is tasks over the time from the first send to the \
         last Job seen. The ratio is the median of the per-round ratios.\n",
        sizes.ratio_tasks, sizes.concurrency
    );
    let _ = writeln!(
        out,
        "| round | direct Jobs | direct tasks/s | direct p50 / p99 | agent-bus Jobs | agent-bus tasks/s | agent-bus p50 / p99 | ratio |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (i, (d, o)) in r.ratio.rounds.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {} / {} | {} | {:.1} | {} / {} | {:.2} |",
            i + 1,
            d.tasks,
            d.per_second,
            ms(d.p50_ms),
            ms(d.p99_ms),
            o.tasks,
            o.per_second,
            ms(o.p50_ms),
            ms(o.p99_ms),
            o.per_second / d.per_second
        );
    }
    let _ = writeln!(
        out,
        "\nMedian ratio agent-bus / direct: **{:.2}**",
        r.ratio.median
    );

    let _ = writeln!(out, "\n## (c) The API alone\n");
    let _ = writeln!(
        out,
        "`serve --roles api` (nothing launches, so the queue grows), open loop for {:.0} s per rate, one dispatcher per \
         store for all its rates; *accepted* is 201 within {:.0} s; latency over the accepted.\n",
        sizes.step.as_secs_f64(),
        sizes.request_timeout.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| store | rate/s | accepted | 503 overloaded | other errors | timed out | p50 | p99 | RSS after |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for s in &r.api {
        let _ = writeln!(
            out,
            "| {} | {} | {}/{} ({:.1} %) | {} | {} | {} | {} | {} | {:.0} MiB |",
            s.backend,
            s.rate,
            s.accepted,
            s.sent,
            s.fraction() * 100.0,
            s.overloaded,
            s.other,
            s.timed_out,
            ms(s.p50_ms),
            ms(s.p99_ms),
            s.rss_mib
        );
    }

    let _ = writeln!(
        out,
        "\n## (d) The pipeline with the Kubernetes create stubbed out\n"
    );
    let s = &r.stubbed;
    let _ = writeln!(
        out,
        "All roles, `--executor stub` (every launch answers at once, nothing is created), PostgreSQL and Redis: {} tasks \
         submitted with {} in flight, through store, queue, claim and the `launched` record.\n\n\
         | figure | tasks/s |\n| --- | --- |\n| submit→`launched` (first send to last `launched` event) | {:.0} |\n\
         | accepted by the API | {:.0} |\n| launched by the launcher (first claim to last `launched`) | {:.0} |",
        s.tasks,
        sizes.concurrency * 2,
        s.per_second,
        s.accepted_per_second,
        s.launch_per_second
    );

    let _ = writeln!(out, "\n## (e) Dispatcher memory\n");
    let _ = writeln!(
        out,
        "VmRSS of the dispatcher process: idle (started, nothing submitted) {:.1} MiB; watching {} active Jobs it \
         launched (largest of five samples, one a second) {:.1} MiB.",
        r.idle_rss, r.active_jobs, r.rss_active
    );

    if let Some(m) = &r.million {
        out.push_str(&million_markdown(m));
    }
    out.push_str(&goals(r));
    out
}

/// (f)'s section: the figures with a small backlog and with the million.
pub(crate) fn million_markdown(m: &Million) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n## (f) With a million tasks queued\n");
    let _ = writeln!(
        out,
        "An API dispatcher (`--roles api`, PostgreSQL, Redis) at {}/s open loop, before and after {} queued tasks \
         were inserted in SQL (the rows, `queued` events and tenant counter the API writes) and enqueued in Redis \
         ({:.0} s); dispatch rate: a stub launcher beside it, tasks `launched` a second over the window.\n\n\
         | queue | submit p50 | submit p99 | dispatch tasks/s |\n| --- | --- | --- | --- |\n\
         | small backlog | {} | {} | {:.0} |\n| {} queued | {} | {} | {:.0} |",
        m.rate,
        m.queued,
        m.insert_seconds,
        ms(m.empty_p50_ms),
        ms(m.empty_p99_ms),
        m.empty_dispatch,
        m.queued,
        ms(m.full_p50_ms),
        ms(m.full_p99_ms),
        m.full_dispatch
    );
    out
}

/// (f)'s figures alone, one line of JSON (`--only-million`).
pub(crate) fn million_summary(m: &Million) -> String {
    serde_json::json!({"million": million_json(m)}).to_string()
}

fn million_json(m: &Million) -> serde_json::Value {
    serde_json::json!({"queued": m.queued, "rate": m.rate,
                       "submit_p50_ms_empty": rounded(m.empty_p50_ms, 1), "submit_p99_ms_empty": rounded(m.empty_p99_ms, 1),
                       "submit_p50_ms_full": rounded(m.full_p50_ms, 1), "submit_p99_ms_full": rounded(m.full_p99_ms, 1),
                       "dispatch_per_s_empty": rounded(m.empty_dispatch, 1), "dispatch_per_s_full": rounded(m.full_dispatch, 1)})
}

/// `v` to `digits` decimals for the JSON, null when not measured.
fn rounded(v: f64, digits: i32) -> serde_json::Value {
    if v.is_finite() {
        let scale = 10f64.powi(digits);
        serde_json::json!((v * scale).round() / scale)
    } else {
        serde_json::Value::Null
    }
}

/// The goals of issue 15, each against its figure.
fn goals(r: &Results) -> String {
    let mut out = String::from(
        "\n## Goals (issue 15)\n\n| goal | measured | status | what holds it |\n| --- | --- | --- | --- |\n",
    );
    let mut row = |goal: &str, measured: String, met: bool, holder: String| {
        let _ = writeln!(
            out,
            "| {goal} | {measured} | {} | {} |",
            mark(met),
            if met { "" } else { &holder }
        );
    };
    // The highest rate: past saturation, where the backlog builds shows what bounds
    // the throughput.
    let saturated = r.steps.last();
    let holder_of = |step: Option<&RateStep>| {
        step.map_or_else(String::new, |s| {
            let (stage, took) = s.breakdown.largest_step();
            format!(
                "at {}/s the largest p50 step is *{stage}* (+{took:.0} ms); {}",
                s.rate,
                means_line(s)
            )
        })
    };
    row(
        "saturated throughput ≥ 0.9 × kube-rs direct",
        format!(
            "{:.2} × (median of {} rounds)",
            r.ratio.median,
            r.ratio.rounds.len()
        ),
        r.ratio.median >= 0.9,
        holder_of(saturated),
    );
    let at20 = r.step_at(20);
    let (p50, p99) = at20.map_or((f64::NAN, f64::NAN), RateStep::job_seen);
    row(
        "at 20 tasks/s, submit→Job p50 ≤ 50 ms",
        ms(p50),
        p50 <= 50.0,
        holder_of(at20),
    );
    row(
        "at 20 tasks/s, submit→Job p99 ≤ 250 ms",
        ms(p99),
        p99 <= 250.0,
        at20.map_or_else(String::new, |s| {
            let mut previous = 0.0;
            let mut largest = ("none", f64::NEG_INFINITY);
            for (stage, at) in STAGES.iter().zip(&s.breakdown.p99) {
                if at.is_finite() {
                    if at - previous > largest.1 {
                        largest = (stage, at - previous);
                    }
                    previous = *at;
                }
            }
            format!(
                "the largest p99 step is *{}* (+{:.0} ms)",
                largest.0, largest.1
            )
        }),
    );
    for backend in ["PostgreSQL+Redis", "SQLite"] {
        let step = r
            .api_at(backend, 1000)
            .or_else(|| r.api.iter().rev().find(|s| s.backend == backend));
        let (measured, met, holder) = step.map_or_else(
            || ("not run".to_owned(), false, String::new()),
            |s| {
                (
                    format!("{}/s: p99 {}, {:.1} % accepted, {} × 503", s.rate, ms(s.p99_ms), s.fraction() * 100.0, s.overloaded),
                    s.p99_ms <= 20.0 && s.accepted == s.sent,
                    "the API's submit (store insert and enqueue): requests beyond what it answers are shed (503) or wait".to_owned(),
                )
            },
        );
        row(
            &format!("API submit p99 ≤ 20 ms at 1000/s, all accepted, {backend}"),
            measured,
            met,
            holder,
        );
    }
    let s = &r.stubbed;
    row(
        "stubbed pipeline ≥ 5000 tasks/s",
        format!("{:.0} tasks/s", s.per_second),
        s.per_second >= 5000.0,
        if s.accepted_per_second < s.launch_per_second {
            format!(
                "the API: it accepted {:.0}/s while the launcher launched {:.0}/s",
                s.accepted_per_second, s.launch_per_second
            )
        } else {
            format!(
                "the launcher: {:.0}/s while the API accepted {:.0}/s",
                s.launch_per_second, s.accepted_per_second
            )
        },
    );
    row(
        "RSS ≤ 64 MiB idle",
        format!("{:.1} MiB", r.idle_rss),
        r.idle_rss <= 64.0,
        "memory at start".to_owned(),
    );
    row(
        &format!(
            "RSS ≤ 256 MiB with 10,000 active Jobs (run: {})",
            r.active_jobs
        ),
        format!("{:.1} MiB", r.rss_active),
        r.rss_active <= 256.0 && r.active_jobs >= 10_000,
        if r.active_jobs < 10_000 {
            "fewer Jobs than the goal names (smoke or a smaller --active-jobs)".to_owned()
        } else {
            "the watcher's caches".to_owned()
        },
    );
    match &r.million {
        Some(m) => {
            row(
                "with 1M queued, submit p99 within 2× of empty",
                format!("{} against {}", ms(m.full_p99_ms), ms(m.empty_p99_ms)),
                m.full_p99_ms <= 2.0 * m.empty_p99_ms,
                "the submit path with a large tasks table".to_owned(),
            );
            row(
                "with 1M queued, dispatch rate within 10 % of empty",
                format!("{:.0}/s against {:.0}/s", m.full_dispatch, m.empty_dispatch),
                m.full_dispatch >= 0.9 * m.empty_dispatch,
                "the launcher's reads of a large queue (its reconciler pages the queued tasks)"
                    .to_owned(),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| with 1M queued (submit p99, dispatch rate) | not run (`tests/bench --million`) | | |"
            );
        }
    }
    if let Some(rate) = r.sustained() {
        let _ = writeln!(out, "\nHighest arrival rate sustained (a): {rate} tasks/s.");
    }
    out
}

/// The headline figures, one line of JSON.
pub(crate) fn summary(r: &Results) -> String {
    let number = |v: f64| rounded(v, 1);
    let at = |rate| {
        r.step_at(rate)
            .map_or((f64::NAN, f64::NAN), RateStep::job_seen)
    };
    let (p50_20, p99_20) = at(20);
    let api = |backend: &str| {
        r.api_at(backend, 1000).or_else(|| r.api.iter().rev().find(|s| s.backend == backend)).map(|s| {
            serde_json::json!({"rate": s.rate, "p50_ms": number(s.p50_ms), "p99_ms": number(s.p99_ms),
                               "accepted_fraction": rounded(s.fraction(), 3), "overloaded_503": s.overloaded})
        })
    };
    let million = r.million.as_ref().map(million_json);
    serde_json::json!({
        "throughput_ratio_vs_direct": rounded(r.ratio.median, 2),
        "submit_to_job_ms_at_20_per_s": {"p50": number(p50_20), "p99": number(p99_20)},
        "sustained_rate_per_s": r.sustained(),
        "api_postgres_redis": api("PostgreSQL+Redis"),
        "api_sqlite": api("SQLite"),
        "stub_pipeline_tasks_per_s": number(r.stubbed.per_second),
        "rss_mib_idle": number(r.idle_rss),
        "rss_mib_active": number(r.rss_active),
        "active_jobs": r.active_jobs,
        "million": million,
    })
    .to_string()
}
