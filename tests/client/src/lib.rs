//! The agent-bus API client that progenitor generates from `docs/openapi.json` (see
//! `build.rs`): `Client::new(base_url)` and a method per operation id (`submit_task`,
//! `get_task`, `list_tasks`, …). It exists to prove the document serves a client
//! generator; `tests/client.rs` drives a real dispatcher with it.

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    unreachable_pub,
    unused_imports,
    missing_docs
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/client.rs"));
}

pub use generated::*;
