//! The runner's integration tests, one test binary (it links once) with a module per
//! concern. They run the built `runner` binary around real commands:
//!
//! - `process`: exit codes, output, signals, timeout, spawn failures, classification;
//! - `reports`: reports to a receiver (heartbeats, progress, usage, refusals, retries);
//! - `logs`: the command's output lines shipped to the receiver's `/logs` route;
//! - `report_command`: the `runner report` subcommand;
//! - `gpu`: the NVML path with a fake library built with `cc` (skips without one);
//! - `old_userland`: the glibc 2.31 build in a Debian bullseye root; needs
//!   `AGENT_BUS_RUNNER_GLIBC231` and `AGENT_BUS_BULLSEYE_ROOT` (exported by `tests/run`),
//!   skips with one line without them and fails under `make test`
//!   (`AGENT_BUS_REQUIRE_ENV=1`).
// Tests fail by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod gpu;
mod logs;
mod old_userland;
mod process;
mod report_command;
mod reports;
