//! The agent-bus API client that progenitor generates from `docs/openapi.json` (see
//! `build.rs`): `Client::new(base_url)` and a method per operation id (`submit_task`,
//! `get_task`, `list_tasks`, …). It exists to prove the document serves a client
//! generator; `tests/client.rs` drives a real dispatcher with it.

// Generated code is not ours to lint. The workspace denies `unwrap`, which progenitor uses
// on constant inputs only: the schema's patterns (compiled once) and `Client::new`'s
// default reqwest client.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    missing_debug_implementations,
    unreachable_pub,
    unused_imports,
    missing_docs
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/client.rs"));
}

pub use generated::*;
