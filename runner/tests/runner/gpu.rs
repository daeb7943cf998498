//! The GPU path without a GPU: the runner loads `fake_nvml/fake_nvml.c`, built here with
//! `cc -shared`, in place of libnvidia-ml.so.1 (through `AGENT_BUS_NVML_LIBRARY`), so
//! discovery, samples in heartbeats, the finished summary and Xid events run through the
//! real nvml-wrapper and libloading code. The real library is exercised on GPU machines.

// Tests fail by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Receiver, Runner, fake_nvml, finished, kinds, wait_for_file};
use protocol::{FailureClass, ReportBody};

#[test]
fn gpus_are_discovered_sampled_and_summarised() {
    let Some(lib) = fake_nvml() else { return };
    let receiver = Receiver::start();
    let run = Runner::new()
        .report_to(&receiver)
        .env("AGENT_BUS_NVML_LIBRARY", &lib)
        .env("FAKE_NVML_DEVICES", "2")
        .args(["--gpu-sample-seconds", "0.2", "--heartbeat-seconds", "0.3"]);
    let go = run.dir.path("go");
    let running = run.sh(&format!("{}; exit 0", wait_for_file(&go))).spawn();
    receiver.wait_for("a heartbeat with two GPU samples", |reports| {
        reports
            .iter()
            .any(|r| matches!(&r.body, ReportBody::Heartbeat(h) if h.gpus.len() == 2))
    });
    std::fs::write(&go, "").unwrap();
    let out = running.wait();
    assert_eq!(out.code(), 0, "{}", out.stderr());
    assert!(
        !out.stderr().contains("GPU stats"),
        "no NVML complaint expected: {}",
        out.stderr()
    );

    let reports = receiver.delivered();
    let ReportBody::Started(started) = &reports[0].body else {
        panic!("{:?}", kinds(&reports))
    };
    assert_eq!(started.gpus.len(), 2);
    assert_eq!(started.gpus[1].index, 1);
    assert_eq!(started.gpus[1].name.as_deref(), Some("Fake A100-SXM4-80GB"));
    assert_eq!(started.gpus[1].uuid.as_deref(), Some("GPU-fake-1"));
    assert_eq!(started.gpus[1].memory_total_bytes, Some(80 << 30));

    let sample = reports
        .iter()
        .find_map(|r| match &r.body {
            ReportBody::Heartbeat(h) if h.gpus.len() == 2 => Some(h.gpus[1].clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(sample.utilization_percent, Some(60.0));
    assert_eq!(sample.memory_used_bytes, Some(2 << 30));
    assert_eq!(sample.power_watts, Some(251.0));
    assert_eq!(sample.temperature_celsius, Some(61.0));

    let f = finished(&reports);
    assert_eq!(f.outcome.failure_class, None);
    let gpu = f.outcome.gpu.unwrap();
    assert_eq!(gpu.gpus, 2);
    assert!(gpu.samples >= 1);
    assert_eq!(gpu.utilization_mean_percent, Some(55.0));
    assert_eq!(gpu.utilization_max_percent, Some(60.0));
    assert_eq!(gpu.memory_used_max_bytes, Some(2 << 30));
    assert_eq!(gpu.power_max_watts, Some(251.0));
    assert_eq!(gpu.temperature_max_celsius, Some(61.0));
    assert!(gpu.xid_errors.is_empty());
    assert_eq!(out.termination().outcome.gpu, Some(gpu));
}

#[test]
fn an_xid_during_the_run_classifies_a_failure_as_gpu_xid() {
    let Some(lib) = fake_nvml() else { return };
    let run = Runner::new()
        .env("AGENT_BUS_NVML_LIBRARY", &lib)
        .env("FAKE_NVML_XID", "79")
        .args(["--gpu-sample-seconds", "0.2"]);
    let go = run.dir.path("go");
    // CUDA OOM text too: an Xid takes precedence.
    let running = run
        .sh(&format!(
            "{}; echo 'CUDA out of memory' >&2; exit 1",
            wait_for_file(&go)
        ))
        .spawn();
    common::wait_until("the Xid log line", common::DEADLINE, || {
        running
            .stderr
            .text()
            .contains("runner: gpu: Xid 79 reported by NVML")
    });
    std::fs::write(&go, "").unwrap();
    let out = running.wait();
    assert_eq!(out.code(), 1);
    let summary = out.termination();
    assert_eq!(summary.outcome.failure_class, Some(FailureClass::GpuXid));
    assert_eq!(summary.outcome.gpu.unwrap().xid_errors, [79]);
}

#[test]
fn zero_gpus_is_one_log_line() {
    let Some(lib) = fake_nvml() else { return };
    let out = Runner::new()
        .env("AGENT_BUS_NVML_LIBRARY", &lib)
        .env("FAKE_NVML_DEVICES", "0")
        .sh("exit 0")
        .run();
    assert_eq!(out.code(), 0);
    let lines: Vec<_> = out
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("GPU"))
        .collect();
    assert_eq!(lines, ["runner: no GPU stats: NVML sees no GPU"]);
    assert_eq!(out.termination().outcome.gpu, None);
}

#[test]
fn a_library_without_nvml_in_it_is_one_log_line() {
    // libc loads fine but has no nvmlInit_v2: an init error, not a missing library.
    let out = Runner::new()
        .env("AGENT_BUS_NVML_LIBRARY", "libc.so.6")
        .sh("exit 0")
        .run();
    assert_eq!(out.code(), 0);
    let lines: Vec<_> = out
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("GPU"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("runner: no GPU stats: NVML init failed"),
        "{lines:?}"
    );
}

#[test]
fn gpu_sampling_can_be_turned_off() {
    let out = Runner::new()
        .args(["--gpu-sample-seconds", "0"])
        .sh("exit 0")
        .run();
    assert_eq!(out.code(), 0);
    assert!(!out.stderr().contains("GPU"), "{}", out.stderr());
}
