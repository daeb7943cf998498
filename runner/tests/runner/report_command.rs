//! `runner report progress|usage`: the workload's side of the line protocol.
// Tests fail by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::process::{Command, Output};

use common::TempDir;

fn report(file: Option<&std::path::Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.arg("report")
        .args(args)
        .env_remove("AGENT_BUS_REPORT_FILE");
    if let Some(file) = file {
        cmd.env("AGENT_BUS_REPORT_FILE", file);
    }
    cmd.output().unwrap()
}

#[test]
fn writes_well_formed_lines() {
    let dir = TempDir::new("report-cmd");
    let file = dir.path("report");
    let ok = |args: &[&str]| {
        let out = report(Some(&file), args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["progress", "40", "epoch 2/5"]);
    ok(&["progress", "12.5"]);
    ok(&["progress", "100", "all", "done"]);
    ok(&[
        "usage",
        "--model",
        "gpt-4o",
        "--calls",
        "1",
        "--input-tokens",
        "1200",
        "--output-tokens",
        "300",
        "--cost-usd",
        "0.0123",
    ]);
    ok(&["usage", "--model", "claude-sonnet-4"]);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        text,
        "progress 40 epoch 2/5\n\
         progress 12.5\n\
         progress 100 all done\n\
         usage model=gpt-4o calls=1 input_tokens=1200 output_tokens=300 cost_usd=0.0123\n\
         usage model=claude-sonnet-4 calls=0 input_tokens=0 output_tokens=0 cost_usd=0\n"
    );
    for line in text.lines() {
        assert!(runner::lines::parse_line(line).unwrap().is_some(), "{line}");
    }
}

#[test]
fn rejects_bad_input_naming_the_field() {
    let dir = TempDir::new("report-cmd-bad");
    let file = dir.path("report");
    let cases: &[(&[&str], &str)] = &[
        (&["progress", "140"], "PERCENT"),
        (&["progress", "-5"], "PERCENT"),
        (&["progress", "half"], "PERCENT"),
        (&["usage", "--calls", "1"], "--model"),
        (&["usage", "--model", "two words"], "--model"),
        (&["usage", "--model", "m", "--calls", "-1"], "--calls"),
        (
            &["usage", "--model", "m", "--input-tokens", "1.5"],
            "--input-tokens",
        ),
        (
            &["usage", "--model", "m", "--output-tokens", "x"],
            "--output-tokens",
        ),
        (
            &["usage", "--model", "m", "--cost-usd", "-0.1"],
            "--cost-usd",
        ),
        (
            &["usage", "--model", "m", "--cost-usd", "NaN"],
            "--cost-usd",
        ),
        (&["launch"], "launch"),
    ];
    for (args, field) in cases {
        let out = report(Some(&file), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(field),
            "{args:?} should name {field}: {stderr}"
        );
    }
    assert!(!file.exists(), "nothing is written for bad input");
}

#[test]
fn fails_when_the_report_file_variable_is_unset() {
    let out = report(None, &["progress", "10"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AGENT_BUS_REPORT_FILE is not set"));
}

#[test]
fn install_copies_the_runner_into_a_folder_that_then_runs_it() {
    let dir = std::env::temp_dir().join(format!("runner-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let output = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["install"])
        .arg(dir.join("bin"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let installed = dir.join("bin/runner");
    let run = Command::new(&installed)
        .args(["--", "sh", "-c", "exit 4"])
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(4),
        "the installed copy runs commands"
    );
    assert!(!dir.join("bin/.runner.partial").exists());
    // A folder that cannot be created: exit 2 with the reason, no panic.
    let refused = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["install", "/proc/no-such-place"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("cannot install into /proc/no-such-place")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
