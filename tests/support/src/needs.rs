//! What a test needs from the test environment (`tests/env/up`), and what happens when it
//! is absent: one line `skipped: …` on a developer's machine, a failure under `make test`.
//!
//! Invariants:
//! - a test that needs the environment says so first, with [`needs_env!`](crate::needs_env)
//!   (or [`environment_present`]), before it touches anything;
//! - a skip is one line on standard error (written past the test harness's capture, so
//!   it shows), naming the first missing piece and how to start the environment;
//! - with [`REQUIRE_ENV`] set (`tests/run`, so `make test` and CI), a missing piece is a
//!   test failure: the suite can never pass by skipping.

use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;

/// Set to `1` by `tests/run`: every test that needs the environment must find it.
pub const REQUIRE_ENV: &str = "AGENT_BUS_REQUIRE_ENV";

/// One piece of the test environment a test stands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The shared PostgreSQL server (`DATABASE_URL`).
    Postgres,
    /// The shared Redis server (`REDIS_URL`).
    Redis,
    /// The Kubernetes control plane (`KUBECONFIG`).
    Cluster,
    /// Debian's PostgreSQL binaries (`initdb`, `pg_ctl` under `/usr/lib/postgresql`), for a
    /// server of the test's own.
    PostgresBinaries,
    /// A program on the `PATH` (helm, kubectl, promtool, deploylint…).
    Program(&'static str),
    /// Any other variable that `tests/run` or `tests/env/up` exports.
    Var(&'static str),
}

impl Need {
    /// `None` when present, otherwise what is missing.
    #[must_use]
    pub fn missing(self) -> Option<Missing> {
        let present = match self {
            Self::Postgres => var_set("DATABASE_URL"),
            Self::Redis => var_set("REDIS_URL"),
            Self::Cluster => var_set("KUBECONFIG"),
            Self::Var(name) => var_set(name),
            Self::Program(name) => find_program(name).is_some(),
            Self::PostgresBinaries => postgres_bin().is_some(),
        };
        (!present).then_some(Missing(self))
    }
}

/// A piece of the environment that is not there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing(pub Need);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Need::Postgres => f.write_str("DATABASE_URL is not set"),
            Need::Redis => f.write_str("REDIS_URL is not set"),
            Need::Cluster => f.write_str("KUBECONFIG is not set"),
            Need::Var(name @ "AGENT_BUS_RUNNER_GLIBC231") => {
                write!(
                    f,
                    "{name} is not set (export it from tests/env/build-runner)"
                )
            }
            Need::Var(name @ "AGENT_BUS_BULLSEYE_ROOT") => {
                write!(
                    f,
                    "{name} is not set (export it from tests/env/bullseye-root)"
                )
            }
            Need::Var(name @ "AGENT_BUS_SCHEMATHESIS") => {
                write!(
                    f,
                    "{name} is not set (export it from tests/env/schemathesis)"
                )
            }
            Need::Var(name) => write!(f, "{name} is not set"),
            Need::Program(name) => write!(f, "{name} is not on PATH"),
            Need::PostgresBinaries => {
                f.write_str("no PostgreSQL bin folder under /usr/lib/postgresql")
            }
        }
    }
}

/// Whether `needs` are all present. If one is not: under [`REQUIRE_ENV`] the test fails
/// (panics) naming it; otherwise one `skipped: …` line goes to standard error and the
/// answer is `false`, so the test returns at once.
#[must_use]
#[track_caller]
#[allow(clippy::panic)]
pub fn environment_present(needs: &[Need]) -> bool {
    let Some(missing) = needs.iter().find_map(|need| need.missing()) else {
        return true;
    };
    assert!(
        !environment_required(),
        "{REQUIRE_ENV} is set (make test, CI) but the test environment is incomplete: \
         {missing}; `tests/run` starts it with `tests/env/up`"
    );
    // Straight to the standard error stream, not through `eprintln!`, which the test
    // harness captures and shows only for failing tests: a skip must be seen.
    let _ = writeln!(
        std::io::stderr().lock(),
        "skipped: needs the test environment (eval \"$(tests/env/up)\"): {missing}"
    );
    false
}

/// Whether a missing environment is a failure rather than a skip ([`REQUIRE_ENV`] set to
/// anything but empty or `0`).
#[must_use]
pub fn environment_required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|value| !value.is_empty() && value != "0")
}

/// Returns from the calling test (skips it) unless the named pieces of the environment
/// are present; see [`environment_present`]. In a test returning `Result`, give the value
/// to return after `=>`.
///
/// ```ignore
/// testsupport::needs_env!(Postgres, Cluster, Program("helm"));
/// testsupport::needs_env!(Redis => Ok(()));
/// ```
#[macro_export]
macro_rules! needs_env {
    ($($need:ident $(($arg:expr))?),+ $(,)? => $skipped:expr) => {
        if !$crate::environment_present(&[$($crate::Need::$need $(($arg))?),+]) {
            return $skipped;
        }
    };
    ($($need:ident $(($arg:expr))?),+ $(,)?) => {
        if !$crate::environment_present(&[$($crate::Need::$need $(($arg))?),+]) {
            return;
        }
    };
}

fn var_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|value| !value.is_empty())
}

/// The program `name` on the `PATH`, if it is there.
#[must_use]
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The newest PostgreSQL bin folder under `/usr/lib/postgresql` (Debian's layout).
#[must_use]
pub fn postgres_bin() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("bin"))
        .filter(|path| path.join("initdb").exists())
        .max()
}

#[cfg(test)]
mod tests {
    use super::{Missing, Need};

    #[test]
    fn a_missing_piece_names_itself() {
        assert_eq!(
            Missing(Need::Program("helm")).to_string(),
            "helm is not on PATH"
        );
        assert_eq!(
            Missing(Need::Postgres).to_string(),
            "DATABASE_URL is not set"
        );
        assert_eq!(
            Need::Var("AGENT_BUS_TEST_SURELY_UNSET_VARIABLE").missing(),
            Some(Missing(Need::Var("AGENT_BUS_TEST_SURELY_UNSET_VARIABLE")))
        );
        assert_eq!(Need::Program("sh").missing(), None);
    }
}
