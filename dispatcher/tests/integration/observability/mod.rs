//! Metrics, cost, usage and budgets through the API: `GET /metrics` after real traffic and
//! real transitions, the cost a task shows as it runs and once it is settled, LLM usage
//! reported by runners (counted once however often it is resent), `GET /v1/usage`, tenant
//! budgets that alert or refuse (402), and the `dispatcher tenant` budget flags. Each case
//! runs on a fresh PostgreSQL database and on an SQLite file.
//!
//! A test cannot wait an hour for a task to run, so where a figure needs running time the
//! test moves the task's stage timestamps back with plain SQL (a connection of its own to
//! the same database) before the store settles the cost.
// Metric values are compared exactly where they are counts (whole numbers, exact in f64);
// money and durations go through `assert_close`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::float_cmp
)]

mod support;

mod budgets;
mod llm_usage;
mod metrics;
mod usage;
