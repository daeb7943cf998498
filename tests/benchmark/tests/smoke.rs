//! The benchmark's smoke (`bench --smoke`), so it cannot rot: every part runs for a few
//! seconds with tiny counts against the test environment, with the `bench` and
//! `dispatcher` binaries of this same build (`cargo test --workspace` builds both; the
//! figures are a debug build's and mean nothing). It writes no docs/BENCHMARKS.md.

use std::path::Path;
use std::process::Command;

#[test]
fn every_part_of_the_bench_runs_and_ends_with_a_json_summary() {
    testsupport::needs_env!(Cluster, Postgres, Redis);
    // This binary is in target/<profile>/deps; the dispatcher is built one folder up.
    let exe = std::env::current_exe().unwrap();
    let dispatcher = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("dispatcher");
    assert!(
        dispatcher.is_file(),
        "{} is missing: run with `cargo test --workspace`, or `cargo build -p dispatcher` first",
        dispatcher.display()
    );
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--smoke")
        .arg("--dispatcher")
        .arg(&dispatcher)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench --smoke failed\n{stderr}\n{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("the last line is not the JSON summary ({e}):\n{stdout}"));
    for key in [
        "throughput_ratio_vs_direct",
        "stub_pipeline_tasks_per_s",
        "rss_mib_idle",
        "rss_mib_active",
    ] {
        assert!(summary[key].is_number(), "{key} missing from {summary}");
    }
    for part in ["## (a)", "## (b)", "## (c)", "## (d)", "## (e)", "## Goals"] {
        assert!(stdout.contains(part), "no {part} in\n{stdout}");
    }
}
