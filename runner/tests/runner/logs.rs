//! The command's output lines shipped to the `/logs` route beside the pass-through: in
//! order, with stream, time and the token, every one before the finished report; while
//! the receiver is down they wait, and arrive once it is up.
// Tests fail by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use crate::common::{self, Receiver, Runner, wait_for_file};
use protocol::{LogStream, ReportBody};

#[test]
fn output_lines_arrive_in_order_before_the_finished_report() {
    let receiver = Receiver::start();
    let out = Runner::new()
        .report_to(&receiver)
        .args(["--heartbeat-seconds", "0"])
        .sh("echo one; echo two >&2; printf 'bad \\377 byte\\r\\n'; printf 'unfinished'; exit 4")
        .run();
    assert_eq!(out.code(), 4, "{}", out.stderr());
    // The container's own output is unchanged (what `kubectl logs` reads).
    assert!(out.stdout().starts_with("one\n"), "{}", out.stdout());
    assert!(out.stderr().contains("two\n"), "{}", out.stderr());

    let lines = receiver.shipped();
    let of = |stream: LogStream| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.line.clone())
            .collect()
    };
    assert_eq!(
        of(LogStream::Stdout),
        ["one", "bad \u{fffd} byte", "unfinished"]
    );
    assert_eq!(of(LogStream::Stderr), ["two"]);
    let sequences: Vec<u64> = lines.iter().map(|l| l.sequence).collect();
    let mut sorted = sequences.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sequences, sorted,
        "numbered in the order read, sent in order"
    );
    for line in &lines {
        line.time.parse::<jiff::Timestamp>().unwrap();
    }
    // Same token, the sibling route, and every line before the finished report.
    let all = receiver.all_requests();
    let last_logs = all
        .iter()
        .rposition(|r| r.path == "/internal/v1/tasks/t-1/attempts/1/logs")
        .expect("a /logs request");
    assert_eq!(
        all[last_logs].authorization.as_deref(),
        Some("Bearer secret-token")
    );
    let finished = all
        .iter()
        .position(|r| {
            r.batch.as_ref().is_some_and(|b| {
                b.reports
                    .iter()
                    .any(|r| matches!(r.body, ReportBody::Finished(_)))
            })
        })
        .expect("a finished report");
    assert!(last_logs < finished, "{all:?}");
}

#[test]
fn lines_wait_for_a_receiver_that_comes_up_late() {
    let port = Receiver::reserve_port();
    let run = Runner::new()
        .env("AGENT_BUS_REPORT_URL", Receiver::url_for_port(port))
        .env("AGENT_BUS_REPORT_TOKEN", "secret-token")
        .args(["--heartbeat-seconds", "0", "--final-flush-seconds", "20"]);
    let go = run.dir.path("go");
    let running = run
        .sh(&format!("echo before; {}; echo after", wait_for_file(&go)))
        .spawn();
    running.wait_for_stdout("before");
    // Down for a while: the first POSTs fail and are retried.
    std::thread::sleep(Duration::from_millis(500));
    let receiver = Receiver::start_on(port);
    std::fs::write(&go, "").unwrap();
    let out = running.wait();
    assert_eq!(out.code(), 0, "{}", out.stderr());
    common::wait_until("both lines", common::DEADLINE, || {
        receiver.shipped().len() == 2
    });
    let lines: Vec<String> = receiver.shipped().into_iter().map(|l| l.line).collect();
    assert_eq!(lines, ["before", "after"]);
}
