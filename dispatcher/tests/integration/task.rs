//! `dispatcher::task` as the crate's fluent fixtures see it: `task::fixtures` is
//! `dispatcher/src/task/fixtures.rs` itself (the unit tests' `crate::task::fixtures`),
//! compiled into this binary, so unit and integration tests share one `TaskFixture`.

pub(crate) use dispatcher::task::*;

#[path = "../../src/task/fixtures.rs"]
#[allow(dead_code, unreachable_pub)]
pub(crate) mod fixtures;
