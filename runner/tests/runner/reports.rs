//! The runner's reports against a fake receiver: order, sequence and token; buffering
//! while the receiver is down; the bounded final flush; refusals that stop retries.
// Tests fail by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use common::{Answer, Receiver, Runner, finished, kinds, unique_by_sequence, wait_for_file};
use protocol::{FailureClass, ReportBody};

#[test]
fn reports_arrive_in_sequence_with_the_token() {
    let receiver = Receiver::start();
    let run = Runner::new()
        .report_to(&receiver)
        .args(["--heartbeat-seconds", "0.3"]);
    let go = run.dir.path("go");
    let runner = env!("CARGO_BIN_EXE_runner");
    let running = run
        .sh(&format!(
            "'{runner}' report progress 40 'epoch 2/5' && \
             '{runner}' report usage --model gpt-4o --calls 1 --input-tokens 1200 --output-tokens 300 --cost-usd 0.0123 && \
             echo 'progress 100 done' >> \"$AGENT_BUS_REPORT_FILE\" && \
             {wait} && exit 3",
            wait = wait_for_file(&go)
        ))
        .spawn();
    receiver.wait_for("progress, usage and a heartbeat", |reports| {
        let k = kinds(reports);
        k.contains(&"heartbeat")
            && k.iter().filter(|k| **k == "progress").count() == 2
            && k.contains(&"usage")
    });
    std::fs::write(&go, "").unwrap();
    let out = running.wait();
    assert_eq!(out.code(), 3, "{}", out.stderr());

    let requests = receiver.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer secret-token"))
    );
    assert!(
        requests
            .iter()
            .all(|r| r.path == "/internal/v1/tasks/t-1/attempts/1/reports")
    );
    let reports = receiver.delivered();
    // Consecutive from the runner's start time (unix ms × 1000), so a replacement pod of
    // the same attempt never reuses these numbers.
    let sequences: Vec<u64> = reports.iter().map(|r| r.sequence).collect();
    let first = sequences[0];
    assert_eq!(
        sequences,
        (first..first + reports.len() as u64).collect::<Vec<_>>()
    );
    let now_ms = jiff::Timestamp::now().as_millisecond() as u64;
    assert!(
        first <= now_ms * 1000 && first >= (now_ms - 600_000) * 1000,
        "{first} is not a start time in ms x 1000"
    );
    let k = kinds(&reports);
    assert_eq!(k.first(), Some(&"started"));
    assert_eq!(k.last(), Some(&"finished"));
    let progress: Vec<_> = reports
        .iter()
        .filter_map(|r| match &r.body {
            ReportBody::Progress(p) => Some((p.percent, p.message.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        progress,
        [
            (40.0, Some("epoch 2/5".to_owned())),
            (100.0, Some("done".to_owned()))
        ]
    );
    let usage = reports
        .iter()
        .find_map(|r| match &r.body {
            ReportBody::Usage(u) => Some(u.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (
            usage.model.as_str(),
            usage.calls,
            usage.input_tokens,
            usage.output_tokens
        ),
        ("gpt-4o", 1, 1200, 300)
    );
    assert!((usage.cost_usd - 0.0123).abs() < 1e-12);
    for r in &reports {
        assert!(
            r.sent_at.ends_with('Z') && r.sent_at.contains('T'),
            "{}",
            r.sent_at
        );
    }

    let ReportBody::Started(started) = &reports[0].body else {
        unreachable!()
    };
    assert_eq!(
        started.runner_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(started.hostname.is_some());
    // NVML absent: no GPU anywhere.
    assert!(started.gpus.is_empty());
    for r in &reports {
        if let ReportBody::Heartbeat(h) = &r.body {
            assert!(h.gpus.is_empty());
            assert!(h.uptime_seconds > 0.0);
        }
    }
    let f = finished(&reports);
    assert_eq!(f.outcome.exit_code, 3);
    assert_eq!(f.outcome.signal, None);
    assert_eq!(f.outcome.failure_class, Some(FailureClass::UserError));
    assert_eq!(f.outcome.gpu, None);
    assert!(f.outcome.duration_seconds > 0.0);
    assert!(f.max_rss_bytes.is_some_and(|b| b > 0));
    assert!(f.cpu_seconds.is_some());
    assert_eq!(out.termination().undelivered_reports, 0);
}

#[test]
fn reports_wait_out_an_outage_and_arrive_once_the_receiver_is_up() {
    let port = Receiver::reserve_port();
    let run = Runner::new()
        .env("AGENT_BUS_REPORT_URL", Receiver::url_for_port(port))
        .env("AGENT_BUS_REPORT_TOKEN", "secret-token")
        .args(["--heartbeat-seconds", "0.2", "--final-flush-seconds", "20"]);
    let go = run.dir.path("go");
    let running = run
        .sh(&format!(
            "for i in 1 2 3 4 5; do echo \"progress $((i * 10)) step $i\" >> \"$AGENT_BUS_REPORT_FILE\"; done; {}; exit 0",
            wait_for_file(&go)
        ))
        .spawn();
    // Connections refused for a while (the runner keeps heartbeating meanwhile)...
    common::wait_until("some heartbeats' worth of time", common::DEADLINE, || {
        running.started.elapsed() > Duration::from_secs(1)
    });
    // ...then the receiver comes up answering 503...
    let receiver = Receiver::start_on(port);
    receiver.answer(Answer::Status(503));
    common::wait_until("two refused batches", common::DEADLINE, || {
        receiver
            .requests()
            .iter()
            .filter(|r| r.status == 503)
            .count()
            >= 2
    });
    assert!(receiver.delivered().is_empty());
    // ...and finally accepts.
    receiver.answer(Answer::Status(200));
    receiver.wait_for("the progress reports", |reports| {
        kinds(reports).iter().filter(|k| **k == "progress").count() == 5
    });
    std::fs::write(&go, "").unwrap();
    let out = running.wait();
    assert_eq!(out.code(), 0, "{}", out.stderr());

    let reports = unique_by_sequence(&receiver.delivered());
    let sequences: Vec<u64> = reports.iter().map(|r| r.sequence).collect();
    let first = sequences[0];
    assert_eq!(
        sequences,
        (first..first + reports.len() as u64).collect::<Vec<_>>(),
        "a sequence is missing"
    );
    let k = kinds(&reports);
    assert_eq!(k[0], "started");
    assert_eq!(k[k.len() - 1], "finished");
    assert!(
        k.iter().filter(|k| **k == "heartbeat").count() >= 2,
        "{k:?}"
    );
    assert_eq!(out.termination().undelivered_reports, 0);
    // One line when delivery started failing, one when it recovered.
    let lines = out.log_lines();
    assert_eq!(
        lines.iter().filter(|l| l.contains("not delivered")).count(),
        1,
        "{lines:?}"
    );
}

#[test]
fn a_receiver_that_never_comes_up_costs_at_most_the_final_flush() {
    let port = Receiver::reserve_port();
    let out = Runner::new()
        .env("AGENT_BUS_REPORT_URL", Receiver::url_for_port(port))
        .args(["--final-flush-seconds", "1", "--heartbeat-seconds", "0.1"])
        .sh("echo 'progress 10' >> \"$AGENT_BUS_REPORT_FILE\"; sleep 0.5; exit 3")
        .run();
    assert_eq!(out.code(), 3, "{}", out.stderr());
    // The command's half second, the one-second flush, and start-up slack.
    assert!(out.elapsed < Duration::from_secs(6), "{:?}", out.elapsed);
    let summary = out.termination();
    assert!(
        summary.undelivered_reports >= 3,
        "{}",
        summary.undelivered_reports
    );
    assert_eq!(summary.outcome.failure_class, Some(FailureClass::UserError));
    assert!(out.stderr().contains("reports were not delivered"));
}

#[test]
fn unauthorized_forbidden_and_attempt_over_stop_retries() {
    for status in [401, 403, 409] {
        let receiver = Receiver::start();
        receiver.answer(Answer::Status(status));
        let run = Runner::new()
            .report_to(&receiver)
            .args(["--heartbeat-seconds", "0.1"]);
        let go = run.dir.path("go");
        let running = run.sh(&format!("{}; exit 0", wait_for_file(&go))).spawn();
        common::wait_until("the first refusal", common::DEADLINE, || {
            !receiver.requests().is_empty()
        });
        // Heartbeats keep coming for a while; none of them is sent.
        common::wait_until("a few heartbeats' worth of time", common::DEADLINE, || {
            running.started.elapsed() > Duration::from_millis(800)
        });
        std::fs::write(&go, "").unwrap();
        let out = running.wait();
        assert_eq!(out.code(), 0);
        assert_eq!(receiver.requests().len(), 1, "HTTP {status}");
        let refused: Vec<_> = out
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("refused"))
            .collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains(&status.to_string()));
        assert!(out.termination().undelivered_reports >= 2);
    }
}

#[test]
fn an_exhausted_allowance_sheds_progress_and_usage_but_keeps_started_and_finished() {
    let receiver = Receiver::start();
    receiver.answer(Answer::Status(429));
    let out = Runner::new()
        .report_to(&receiver)
        .args(["--heartbeat-seconds", "0", "--final-flush-seconds", "2"])
        .sh(r#"
            echo "progress 10 one" >> "$AGENT_BUS_REPORT_FILE"
            echo "usage model=m calls=1 cost_usd=0.5" >> "$AGENT_BUS_REPORT_FILE"
            sleep 0.5
            exit 4
        "#)
        .run();
    assert_eq!(
        out.code(),
        4,
        "the command's exit code, whatever the dispatcher says"
    );
    let requests = receiver.requests();
    assert!(requests.len() >= 2, "{requests:?}");
    // A refused progress or usage report is never sent again; started and finished are.
    let mut sent = std::collections::BTreeMap::<u64, (bool, usize)>::new();
    for report in requests
        .iter()
        .filter_map(|r| r.batch.as_ref())
        .flat_map(|b| b.reports.iter())
    {
        let kept = matches!(
            report.body,
            ReportBody::Started(_) | ReportBody::Finished(_)
        );
        sent.entry(report.sequence).or_insert((kept, 0)).1 += 1;
    }
    assert!(
        sent.values().all(|&(kept, times)| kept || times == 1),
        "{sent:?}"
    );
    assert!(
        sent.values().filter(|&&(kept, _)| !kept).count() >= 1,
        "{sent:?}"
    );
    assert!(
        sent.values().any(|&(kept, times)| kept && times >= 2),
        "{sent:?}"
    );
    let refused: Vec<_> = out
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("429"))
        .collect();
    assert_eq!(refused.len(), 1, "one log line: {refused:?}");
    // The usage still reaches the dispatcher through the termination summary.
    let summary = out.termination();
    assert_eq!(summary.usage.len(), 1);
    assert!(summary.undelivered_reports >= 2, "{summary:?}");
}

#[test]
fn a_spawn_failure_is_reported_as_finished_user_error() {
    let receiver = Receiver::start();
    let out = Runner::new()
        .report_to(&receiver)
        .cmd(["/nonexistent/tool"])
        .run();
    assert_eq!(out.code(), 127);
    let reports = receiver.delivered();
    assert_eq!(kinds(&reports), ["finished"]);
    let f = finished(&reports);
    assert_eq!(f.outcome.exit_code, 127);
    assert_eq!(f.outcome.failure_class, Some(FailureClass::UserError));
    assert!(f.outcome.stderr_tail.unwrap().contains("/nonexistent/tool"));
}

#[test]
fn a_killed_command_reports_signal_and_its_stderr_tail() {
    let receiver = Receiver::start();
    let out = Runner::new()
        .report_to(&receiver)
        .sh("echo 'about to die' >&2; kill -9 $$")
        .run();
    assert_eq!(out.code(), 137);
    let f = finished(&receiver.delivered());
    assert_eq!(f.outcome.signal, Some(9));
    assert_eq!(f.outcome.exit_code, 137);
    // Not OOM-killed (the cgroup counter did not grow, or cannot be read).
    assert_eq!(f.outcome.failure_class, Some(FailureClass::Signal));
    assert_eq!(f.outcome.stderr_tail.as_deref(), Some("about to die"));
}

/// A proxy the task's environment names never sees the reports (and their token): the
/// runner talks to the report endpoint directly.
#[test]
fn reports_ignore_the_proxies_of_the_environment() {
    let receiver = Receiver::start();
    let proxy = format!("http://127.0.0.1:{}", Receiver::reserve_port());
    let mut run = Runner::new().report_to(&receiver);
    for name in [
        "ALL_PROXY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "http_proxy",
        "https_proxy",
    ] {
        run = run.env(name, &proxy);
    }
    let out = run.cmd(["true"]).run();
    assert_eq!(out.code(), 0, "{}", out.stderr());
    let delivered = receiver.delivered();
    assert_eq!(
        kinds(&delivered).last(),
        Some(&"finished"),
        "{:?}",
        kinds(&delivered)
    );
}
