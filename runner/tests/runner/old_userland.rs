//! The glibc 2.31 build of the runner (`tests/env/build-runner`) in an old userland: a
//! minimal Debian bullseye root (`tests/env/bullseye-root`, glibc 2.31 like Ubuntu 20.04
//! CUDA images), entered with chroot. Also checks the binary itself: no symbol above
//! GLIBC_2.31, and libnvidia-ml not linked (NVML is loaded at run time only).
//!
//! `tests/run` sets `AGENT_BUS_RUNNER_GLIBC231` (the binary) and
//! `AGENT_BUS_BULLSEYE_ROOT` (the root). Without them the tests skip with one line, and
//! fail under `make test` (`AGENT_BUS_REQUIRE_ENV`, see `testsupport::needs_env!`).

// Tests fail by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Receiver, fake_nvml, kinds};
use protocol::{FailureClass, TerminationSummary};

/// The built runner and the root, or `None`: the test skips with one line, or fails under
/// `make test` (`testsupport::needs_env!`).
fn inputs() -> Option<(PathBuf, PathBuf)> {
    if !testsupport::environment_present(&[
        testsupport::Need::Var("AGENT_BUS_RUNNER_GLIBC231"),
        testsupport::Need::Var("AGENT_BUS_BULLSEYE_ROOT"),
    ]) {
        return None;
    }
    let var = |name| std::env::var_os(name).map(PathBuf::from);
    var("AGENT_BUS_RUNNER_GLIBC231").zip(var("AGENT_BUS_BULLSEYE_ROOT"))
}

fn output_of(program: &str, args: &[&str], file: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// "GLIBC_2.28" → (2, 28).
fn glibc_versions(objdump: &str) -> Vec<(u32, u32)> {
    let mut versions: Vec<(u32, u32)> = objdump
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.');
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .collect();
    versions.sort_unstable();
    versions.dedup();
    versions
}

#[test]
fn glibc_versions_parse() {
    let text = "0000 DF *UND* 0000 (GLIBC_2.2.5) write\n0000 DF *UND* 0000 GLIBC_2.28 statx\n";
    assert_eq!(glibc_versions(text), [(2, 2), (2, 28)]);
}

#[test]
fn binary_needs_at_most_glibc_2_31_and_does_not_link_nvml() {
    let Some((runner, _)) = inputs() else { return };
    let versions = glibc_versions(&output_of("objdump", &["-T"], &runner));
    let max = versions
        .last()
        .copied()
        .expect("some GLIBC_ symbol versions");
    eprintln!(
        "highest GLIBC symbol version required: GLIBC_{}.{}",
        max.0, max.1
    );
    assert!(max <= (2, 31), "requires GLIBC_{}.{}", max.0, max.1);

    let dynamic = output_of("readelf", &["-d"], &runner);
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(!needed.is_empty(), "{dynamic}");
    assert!(
        needed.iter().all(|l| !l.contains("nvidia")),
        "links NVML: {needed:?}"
    );
}

/// The runner's folder inside the root, removed on drop.
struct InRoot {
    root: PathBuf,
    /// The folder as seen from inside the chroot.
    inside: String,
}

impl InRoot {
    fn new(root: &Path, runner: &Path) -> Self {
        let inside = format!("/tmp/agent-bus-runner-test-{}", std::process::id());
        let dir = Self::host_path(root, &inside);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(runner, dir.join("runner")).unwrap();
        Self {
            root: root.to_owned(),
            inside,
        }
    }

    fn host_path(root: &Path, inside: &str) -> PathBuf {
        root.join(inside.trim_start_matches('/'))
    }

    fn host(&self, name: &str) -> PathBuf {
        Self::host_path(&self.root, &self.inside).join(name)
    }

    fn chroot(&self) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(&self.root)
            .arg(format!("{}/runner", self.inside))
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("TMPDIR", "/tmp");
        cmd
    }
}

impl Drop for InRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Self::host_path(&self.root, &self.inside));
    }
}

#[test]
fn runs_in_a_bullseye_root() {
    let Some((runner, root)) = inputs() else {
        return;
    };
    let ldd = Command::new("chroot")
        .arg(&root)
        .args(["/usr/bin/ldd", "--version"])
        .output()
        .unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    assert!(
        ldd.lines().next().unwrap_or_default().ends_with(" 2.31"),
        "{ldd}"
    );

    let dir = InRoot::new(&root, &runner);
    let receiver = Receiver::start();
    let out = dir
        .chroot()
        .arg("--termination-log")
        .arg(format!("{}/termination-log", dir.inside))
        .env("AGENT_BUS_REPORT_URL", receiver.url())
        .env("AGENT_BUS_REPORT_TOKEN", "secret-token")
        .args(["--", "/bin/sh", "-c"])
        .arg(format!(
            "echo hi; echo oops >&2; {}/runner report progress 50 half way; exit 3",
            dir.inside
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert!(stderr.contains("oops\n"), "{stderr}");
    let nvml: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("runner: no GPU stats: NVML not available"))
        .collect();
    assert_eq!(nvml.len(), 1, "{stderr}");

    let message = std::fs::read_to_string(dir.host("termination-log")).unwrap();
    let summary = TerminationSummary::from_message(&message).unwrap();
    assert_eq!(summary.outcome.exit_code, 3);
    assert_eq!(summary.outcome.failure_class, Some(FailureClass::UserError));
    assert_eq!(summary.outcome.stderr_tail.as_deref(), Some("oops"));
    assert_eq!(summary.undelivered_reports, 0);

    let reports = receiver.delivered();
    assert_eq!(kinds(&reports), ["started", "progress", "finished"]);
}

/// The glibc 2.31 build loads an NVML at run time in the old userland: the fake one
/// (built with the host's cc, which needs nothing newer than bullseye's glibc has).
#[test]
fn loads_nvml_at_run_time_in_a_bullseye_root() {
    let Some((runner, root)) = inputs() else {
        return;
    };
    let Some(fake) = fake_nvml() else { return };
    let dir = InRoot::new(&root, &runner);
    std::fs::copy(&fake, dir.host("libnvidia-ml.so.1")).unwrap();
    let out = dir
        .chroot()
        .arg("--termination-log")
        .arg(format!("{}/termination-log", dir.inside))
        .args(["--gpu-sample-seconds", "0.1"])
        .env(
            "AGENT_BUS_NVML_LIBRARY",
            format!("{}/libnvidia-ml.so.1", dir.inside),
        )
        .env("FAKE_NVML_DEVICES", "2")
        .args(["--", "/bin/sh", "-c", "exit 0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("GPU stats"), "{stderr}");
    let message = std::fs::read_to_string(dir.host("termination-log")).unwrap();
    let summary = TerminationSummary::from_message(&message).unwrap();
    assert_eq!(summary.outcome.gpu.map(|g| g.gpus), Some(2), "{message}");
}
