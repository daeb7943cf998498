//! The runner around a command, without a report receiver: exit codes, output
//! pass-through, signals, timeout, spawn failures, classification and the termination
//! summary.
// Tests fail by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use common::{Runner, wait_for_file};
use nix::sys::signal::Signal;
use protocol::FailureClass;

#[test]
fn exit_codes_pass_through() {
    for code in [0, 3, 255] {
        let out = Runner::new().sh(&format!("exit {code}")).run();
        assert_eq!(out.code(), code, "{}", out.stderr());
        let summary = out.termination();
        assert_eq!(summary.outcome.exit_code, code);
        let want = (code != 0).then_some(FailureClass::UserError);
        assert_eq!(summary.outcome.failure_class, want);
    }
}

#[test]
fn output_passes_through_byte_for_byte() {
    let run = Runner::new();
    // 4 MiB of every byte value on stdout, 1 MiB on stderr, written in odd-sized pieces
    // from several processes of the command at once.
    let blob_out = run.dir.path("out.bin");
    let blob_err = run.dir.path("err.bin");
    let pattern_out: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let pattern_err: Vec<u8> = (0..1 << 20).map(|i: u32| (255 - i % 256) as u8).collect();
    std::fs::write(&blob_out, &pattern_out).unwrap();
    std::fs::write(&blob_err, &pattern_err).unwrap();
    let out = run
        .sh(&format!(
            "dd if='{}' bs=4093 status=none; cat '{}' >&2; printf 'no newline at end'",
            blob_out.display(),
            blob_err.display()
        ))
        .run();
    assert_eq!(out.code(), 0);
    let mut want_out = pattern_out;
    want_out.extend_from_slice(b"no newline at end");
    assert!(
        out.stdout == want_out,
        "stdout differs (len {} vs {})",
        out.stdout.len(),
        want_out.len()
    );
    // The runner's own lines come before or after the command's bytes, never inside them.
    let found = out
        .stderr
        .windows(pattern_err.len())
        .any(|w| w == pattern_err.as_slice());
    assert!(
        found,
        "stderr does not contain the command's bytes unchanged"
    );
}

#[test]
fn sigterm_reaches_the_command_which_may_exit_cleanly() {
    let running = Runner::new()
        .args(["--grace-seconds", "20"])
        .sh("trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.05; done")
        .spawn();
    running.wait_for_stdout("ready");
    running.signal(Signal::SIGTERM);
    let out = running.wait();
    assert_eq!(out.code(), 0, "{}", out.stderr());
    assert!(out.stdout().contains("got-term"));
    assert_eq!(out.termination().outcome.failure_class, None);
    assert!(out.elapsed < Duration::from_secs(15), "{:?}", out.elapsed);
}

#[test]
fn a_command_ignoring_sigterm_is_killed_after_the_grace_period() {
    let running = Runner::new()
        .args(["--grace-seconds", "0.5"])
        .sh("trap '' TERM INT; echo ready; while :; do sleep 0.05; done")
        .spawn();
    running.wait_for_stdout("ready");
    running.signal(Signal::SIGINT);
    let out = running.wait();
    assert_eq!(out.code(), 137, "{}", out.stderr());
    let summary = out.termination();
    assert_eq!(summary.outcome.signal, Some(9));
    assert_eq!(summary.outcome.failure_class, Some(FailureClass::Signal));
    assert!(out.stderr().contains("sending SIGKILL"));
}

#[test]
fn other_signals_are_forwarded_too() {
    let running = Runner::new()
        .sh("trap 'echo got-usr1' USR1; trap 'echo got-hup; exit 7' HUP; echo ready; while :; do sleep 0.05; done")
        .spawn();
    running.wait_for_stdout("ready");
    running.signal(Signal::SIGUSR1);
    running.wait_for_stdout("got-usr1");
    running.signal(Signal::SIGHUP);
    let out = running.wait();
    assert_eq!(out.code(), 7);
    // Exit after a forwarded terminating signal: the signal is the reason.
    assert_eq!(
        out.termination().outcome.failure_class,
        Some(FailureClass::Signal)
    );
}

#[test]
fn timeout_sends_sigterm_then_classifies_as_timeout() {
    let out = Runner::new()
        .args(["--timeout-seconds", "1", "--grace-seconds", "20"])
        .sh("trap 'echo got-term; exit 143' TERM; while :; do sleep 0.05; done")
        .run();
    assert_eq!(out.code(), 143, "{}", out.stderr());
    assert!(out.stdout().contains("got-term"));
    assert_eq!(
        out.termination().outcome.failure_class,
        Some(FailureClass::Timeout)
    );
    assert!(out.stderr().contains("timeout of 1s reached"));
}

#[test]
fn timeout_kills_a_command_that_ignores_sigterm() {
    let out = Runner::new()
        .args(["--timeout-seconds", "0.5", "--grace-seconds", "0.5"])
        .sh("trap '' TERM; while :; do sleep 0.05; done")
        .run();
    assert_eq!(out.code(), 137);
    assert_eq!(
        out.termination().outcome.failure_class,
        Some(FailureClass::Timeout)
    );
}

#[test]
fn a_missing_command_exits_127_and_a_non_executable_one_126() {
    let out = Runner::new().cmd(["/nonexistent/tool", "--flag"]).run();
    assert_eq!(out.code(), 127);
    assert!(
        out.stderr()
            .contains("runner: cannot run \"/nonexistent/tool\""),
        "{}",
        out.stderr()
    );
    let summary = out.termination();
    assert_eq!(summary.outcome.exit_code, 127);
    assert_eq!(summary.outcome.failure_class, Some(FailureClass::UserError));

    let run = Runner::new();
    let script = run.dir.path("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let out = run.cmd([script.to_string_lossy()]).run();
    assert_eq!(out.code(), 126);
    assert_eq!(
        out.termination().outcome.failure_class,
        Some(FailureClass::UserError)
    );
}

#[test]
fn cuda_oom_on_stderr_is_classified_even_when_split_across_writes() {
    let out = Runner::new()
        .sh("echo 'Traceback (most recent call last):' >&2; printf 'torch.OutOfMemoryError: CUDA out ' >&2; sleep 0.2; printf 'of memory. Tried to allocate 2.00 GiB\\n' >&2; exit 1")
        .run();
    assert_eq!(out.code(), 1);
    let summary = out.termination();
    assert_eq!(summary.outcome.failure_class, Some(FailureClass::CudaOom));
    let tail = summary.outcome.stderr_tail.unwrap();
    assert!(tail.ends_with("Tried to allocate 2.00 GiB"), "{tail}");

    // The same text on stdout counts too; a success stays a success.
    let out = Runner::new()
        .sh("echo 'RESOURCE_EXHAUSTED: Out of memory while trying to allocate'; exit 2")
        .run();
    assert_eq!(
        out.termination().outcome.failure_class,
        Some(FailureClass::CudaOom)
    );
    let out = Runner::new()
        .sh("echo 'CUDA out of memory (handled)'")
        .run();
    assert_eq!(out.termination().outcome.failure_class, None);
}

#[test]
fn termination_summary_is_written_and_parseable() {
    let out = Runner::new()
        .sh(r#"for i in $(seq 1 30); do echo "err line $i" >&2; done
               echo 'usage model=gpt-4o calls=1 input_tokens=10 output_tokens=5 cost_usd=0.5' >> "$AGENT_BUS_REPORT_FILE"
               echo 'usage model=gpt-4o calls=2 input_tokens=20 output_tokens=10 cost_usd=0.25' >> "$AGENT_BUS_REPORT_FILE"
               echo 'usage model=small calls=1' >> "$AGENT_BUS_REPORT_FILE"
               exit 4"#)
        .run();
    assert_eq!(out.code(), 4);
    let text = std::fs::read_to_string(out.dir.path("termination-log")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["v"], 1);
    let summary = out.termination();
    assert_eq!(summary.outcome.exit_code, 4);
    assert_eq!(summary.outcome.failure_class, Some(FailureClass::UserError));
    assert!(summary.outcome.duration_seconds > 0.0);
    assert_eq!(summary.undelivered_reports, 0);
    assert_eq!(summary.usage.len(), 2);
    let gpt = &summary.usage[0];
    assert_eq!(
        (
            gpt.model.as_str(),
            gpt.calls,
            gpt.input_tokens,
            gpt.output_tokens
        ),
        ("gpt-4o", 3, 30, 15)
    );
    assert!((gpt.cost_usd - 0.75).abs() < 1e-9);
    assert_eq!(summary.usage[1].model, "small");
    let tail = summary.outcome.stderr_tail.unwrap();
    assert_eq!(tail.lines().count(), 20, "{tail}");
    assert!(
        tail.starts_with("err line 11\n") && tail.ends_with("err line 30"),
        "{tail}"
    );
}

#[test]
fn an_unwritable_termination_log_is_one_log_line() {
    let out = Runner::new()
        .termination_log("/nonexistent-dir/termination-log")
        .sh("exit 5")
        .run();
    assert_eq!(out.code(), 5);
    let lines: Vec<_> = out
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("termination log"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
}

#[test]
fn the_command_gets_the_report_file_but_not_the_token() {
    let out = Runner::new()
        .env("AGENT_BUS_REPORT_TOKEN", "secret-token")
        .env("AGENT_BUS_TASK_ID", "t-42")
        .sh("echo \"token=${AGENT_BUS_REPORT_TOKEN-unset} task=$AGENT_BUS_TASK_ID\"; test -f \"$AGENT_BUS_REPORT_FILE\" && echo file-ok")
        .run();
    assert_eq!(out.code(), 0);
    assert!(
        out.stdout().contains("token=unset task=t-42"),
        "{}",
        out.stdout()
    );
    assert!(out.stdout().contains("file-ok"));
}

#[test]
fn the_command_cannot_read_the_token_from_the_runners_proc_files() {
    // The runner is the command's parent and runs as the same user: without the
    // runner's PR_SET_DUMPABLE 0, `cat /proc/$PPID/environ` prints the token.
    let out = Runner::new()
        .unprivileged()
        .env("AGENT_BUS_REPORT_TOKEN", "secret-token")
        .sh(r#"
            grep -q '^Name:.*runner' /proc/$PPID/status || { echo "parent is not the runner"; exit 7; }
            cat /proc/self/environ > /dev/null || { echo "own environ unreadable"; exit 6; }
            if cat /proc/$PPID/environ > /dev/null 2>&1; then echo "read the runner's environ"; exit 9; fi
            if (exec 3< /proc/$PPID/mem) 2> /dev/null; then echo "opened the runner's mem"; exit 8; fi
            if tr '\0' '\n' < /proc/$PPID/environ 2> /dev/null | grep -q secret-token; then exit 10; fi
            echo protected
        "#)
        .run();
    assert_eq!(out.code(), 0, "{}{}", out.stdout(), out.stderr());
    assert!(out.stdout().contains("protected"), "{}", out.stdout());
}

#[test]
fn nvml_absent_is_one_log_line_and_the_run_succeeds() {
    let out = Runner::new().sh("echo fine").run();
    assert_eq!(out.code(), 0);
    let gpu_lines: Vec<_> = out
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("GPU"))
        .collect();
    assert_eq!(gpu_lines.len(), 1, "{gpu_lines:?}");
    assert!(gpu_lines[0].starts_with("runner: no GPU stats: NVML not available"));
    assert_eq!(out.termination().outcome.gpu, None);
}

#[test]
fn malformed_report_lines_are_skipped_with_a_warning() {
    let out = Runner::new()
        .sh(r#"printf 'progress 140\nusage calls=1\nprogress 50 fine\nusage model=m\n' >> "$AGENT_BUS_REPORT_FILE"; exit 0"#)
        .run();
    assert_eq!(out.code(), 0);
    let warnings: Vec<_> = out
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("malformed line"))
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("percent"));
    assert!(warnings[1].contains("model"));
    assert_eq!(out.termination().usage.len(), 1);
}

#[test]
fn a_background_process_holding_the_output_does_not_hold_the_runner() {
    let run = Runner::new();
    let go = run.dir.path("go");
    let out = run
        .sh(&format!(
            "({}; echo late) & echo main-done; exit 6",
            wait_for_file(&go)
        ))
        .run();
    std::fs::write(out.dir.path("go"), "").unwrap();
    assert_eq!(out.code(), 6);
    assert!(out.stdout().contains("main-done"));
}

/// As PID 1 (in a new PID namespace) the runner reaps orphans and still reports the
/// command's own exit code.
#[test]
fn as_pid_1_orphans_are_reaped() {
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "unshare --pid is needed for this test in CI"
        );
        eprintln!("skipped: unshare --pid is not available here");
        return;
    }
    let dir = common::TempDir::new("pid1");
    let termination = dir.path("termination-log");
    // Two orphans that end soon; their /proc entries vanish only once someone reaps
    // them, which in the namespace can only be the runner (PID 1).
    let pids = dir.path("orphans");
    let script = format!(
        "sh -c 'sleep 0.2 & echo $! >> {p}'; sh -c 'sleep 0.3 & echo $! >> {p}'; \\
         for pid in $(cat {p}); do \\
           i=0; while [ -e /proc/$pid ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \\
           [ -e /proc/$pid ] && echo unreaped=$pid; \\
         done; echo \"pid=$$ ppid=$PPID done\"; exit 9",
        p = pids.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(env!("CARGO_BIN_EXE_runner"))
        .arg("--termination-log")
        .arg(&termination)
        .env("AGENT_BUS_NVML_LIBRARY", "/nonexistent")
        .args(["--", "/bin/sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(9),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ppid=1 done") && !stdout.contains("unreaped"),
        "{stdout}"
    );
    let summary =
        protocol::TerminationSummary::from_message(&std::fs::read_to_string(termination).unwrap())
            .unwrap();
    assert_eq!(summary.outcome.exit_code, 9);
}
