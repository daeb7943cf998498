//! The dispatcher's integration tests, one test binary (it links once) with a module per
//! tier and concern:
//!
//! - hermetic (no environment needed): `api`, `observability` and the SQLite halves of
//!   the store cases (`store::sqlite`, `*::sqlite`), the in-process queue
//!   (`queue::memory_backend`), and `local` (the `dispatcher` binary with the local
//!   executor on an SQLite file), `secrets` (and its `local_*` end to end), `listeners`
//!   (its api and metrics listeners), and `isolation` (the local executor as root: tasks
//!   as users of their own, the report endpoint's refusals), `openapi` (the served
//!   document against `docs/openapi.json`; Schemathesis against it needs
//!   `AGENT_BUS_SCHEMATHESIS`);
//! - on the test environment (`eval "$(tests/env/up)"`): the PostgreSQL halves
//!   (`*::postgres`), Redis (`queue::redis_*`), `outage` (a PostgreSQL server of its
//!   own), `failover` (two Redis servers of its own, one demoted under a dispatcher), `cluster` (end to end on the control plane), `tls` (TLS to both datastores;
//!   its refusals of unchecked TLS settings need nothing).
//!
//! A test that needs the environment says so first with `testsupport::needs_env!`: it
//! skips with one `skipped: …` line without it, and fails under `make test`
//! (`AGENT_BUS_REQUIRE_ENV=1`, set by `tests/run`). See `docs/TESTING.md`.
// Tests fail by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod task;

mod api;
mod cluster;
mod failover;
mod feed;
mod followed;
mod isolation;
mod listeners;
mod listing;
mod local;
mod logs;
mod observability;
mod openapi;
mod outage;
mod queue;
mod quota;
mod retries;
mod schema;
mod secrets;
mod security;
mod store;
mod tls;
mod webhooks;
