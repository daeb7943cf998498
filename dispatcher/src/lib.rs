//! agent-bus dispatcher: takes tasks over REST, keeps their state in PostgreSQL (or an
//! SQLite file), orders them through Redis (or an in-process queue), and launches each as
//! exactly one Kubernetes Job (or a local process), watching it to the end.
//!
//! Modules are domain concepts around a pure core: [`task`] (what a task is and how its
//! state may move) and [`placement`] know nothing of Kubernetes, SQL, Redis or HTTP;
//! [`launcher::job_spec`] is a pure function from a task to its Job. [`config`] parses the
//! flags and environment into types; [`app`] wires the parts into the commands the
//! binary runs, and is the only module that uses `anyhow`.

pub mod api;
pub mod app;
pub mod config;
pub mod cost;
pub mod k8s;
pub mod launcher;
pub mod lifecycle;
pub mod metrics;
pub mod placement;
pub mod queue;
pub mod report;
pub mod secrets;
pub mod store;
pub mod task;
mod tls;
pub mod watcher;
pub mod webhooks;

#[cfg(test)]
mod layout_tests;
