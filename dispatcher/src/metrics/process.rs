//! This process, as every Prometheus client library exposes it: the standard `process_*`
//! families (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …), without
//! our `agent_bus_` prefix so that stock dashboards and alerts find them; and
//! `agent_bus_build_info`, which build runs with which executor.
//!
//! The process figures are read from `/proc/self` through the `procfs` crate at each
//! scrape, by a prometheus-client [`Collector`] registered on the root registry (Linux
//! only: elsewhere, and for a figure that cannot be read, the family is absent rather
//! than zero). [`STANDARD`] is both what the collector writes and what the metrics
//! reference describes, so the two cannot drift.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};

use super::registry::{Kind, Registrar};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    executor: String,
}

/// One standard process family: its name as exposed (counters without `_total`, which
/// the encoder adds), kind and help.
#[derive(Debug, Clone, Copy)]
struct Standard {
    figure: Figure,
    name: &'static str,
    kind: Kind,
    help: &'static str,
}

/// What a standard family reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Figure {
    CpuSeconds,
    ResidentMemory,
    VirtualMemory,
    OpenFds,
    MaxFds,
    StartTime,
    Threads,
}

/// The standard families, in exposition order (client_golang's and the `prometheus`
/// crate's names).
const STANDARD: [Standard; 7] = [
    Standard {
        figure: Figure::CpuSeconds,
        name: "process_cpu_seconds",
        kind: Kind::Counter,
        help: "Total user and system CPU time of this process, in seconds",
    },
    Standard {
        figure: Figure::ResidentMemory,
        name: "process_resident_memory_bytes",
        kind: Kind::Gauge,
        help: "Resident memory of this process",
    },
    Standard {
        figure: Figure::VirtualMemory,
        name: "process_virtual_memory_bytes",
        kind: Kind::Gauge,
        help: "Virtual memory of this process",
    },
    Standard {
        figure: Figure::OpenFds,
        name: "process_open_fds",
        kind: Kind::Gauge,
        help: "Open file descriptors of this process",
    },
    Standard {
        figure: Figure::MaxFds,
        name: "process_max_fds",
        kind: Kind::Gauge,
        help: "Most file descriptors this process may open (the soft limit; absent when unlimited)",
    },
    Standard {
        figure: Figure::StartTime,
        name: "process_start_time_seconds",
        kind: Kind::Gauge,
        help: "Start time of this process, in seconds since the Unix epoch",
    },
    Standard {
        figure: Figure::Threads,
        name: "process_threads",
        kind: Kind::Gauge,
        help: "Threads of this process",
    },
];

/// The figures of one scrape; `None` where one could not be read.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Sample {
    cpu_seconds: Option<f64>,
    resident_memory: Option<f64>,
    virtual_memory: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
    start_time: Option<f64>,
    threads: Option<f64>,
}

impl Sample {
    fn get(&self, figure: Figure) -> Option<f64> {
        match figure {
            Figure::CpuSeconds => self.cpu_seconds,
            Figure::ResidentMemory => self.resident_memory,
            Figure::VirtualMemory => self.virtual_memory,
            Figure::OpenFds => self.open_fds,
            Figure::MaxFds => self.max_fds,
            Figure::StartTime => self.start_time,
            Figure::Threads => self.threads,
        }
    }

    /// This process's figures, from `/proc/self`.
    #[cfg(target_os = "linux")]
    fn read() -> Self {
        use procfs::WithCurrentSystemInfo as _;
        use procfs::process::{LimitValue, Process};

        let Ok(me) = Process::myself() else {
            return Self::default();
        };
        let mut sample = Self::default();
        let ticks = procfs::ticks_per_second() as f64;
        if let Ok(stat) = me.stat() {
            sample.cpu_seconds = Some((stat.utime + stat.stime) as f64 / ticks);
            sample.resident_memory = Some(stat.rss_bytes().get() as f64);
            sample.virtual_memory = Some(stat.vsize as f64);
            sample.threads = Some(stat.num_threads as f64);
            sample.start_time = procfs::boot_time_secs()
                .ok()
                .map(|boot| boot as f64 + stat.starttime as f64 / ticks);
        }
        sample.open_fds = me.fd_count().ok().map(|count| count as f64);
        sample.max_fds =
            me.limits()
                .ok()
                .and_then(|limits| match limits.max_open_files.soft_limit {
                    LimitValue::Value(most) => Some(most as f64),
                    LimitValue::Unlimited => None,
                });
        sample
    }

    #[cfg(not(target_os = "linux"))]
    fn read() -> Self {
        Self::default()
    }
}

/// Writes the standard families at each scrape.
#[derive(Debug, Default)]
pub(super) struct ProcessCollector;

impl ProcessCollector {
    /// Adds the standard families to the metrics reference (the collector itself is
    /// registered on the root registry, unprefixed).
    pub(super) fn describe(registrar: &mut Registrar<'_>) {
        for family in STANDARD {
            registrar.describe_standard(family.name, family.kind, family.help);
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode(&Sample::read(), encoder)
    }
}

fn encode(sample: &Sample, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
    for family in STANDARD {
        let Some(value) = sample.get(family.figure) else {
            continue;
        };
        if family.kind == Kind::Counter {
            let counter = ConstCounter::new(value);
            let metric =
                encoder.encode_descriptor(family.name, family.help, None, counter.metric_type())?;
            counter.encode(metric)?;
        } else {
            let gauge = ConstGauge::new(value);
            let metric =
                encoder.encode_descriptor(family.name, family.help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
    }
    Ok(())
}

/// Registers `build_info`, set for `executor`, and describes the standard families. The
/// registry keeps the family; nothing changes it later.
pub(super) fn register(registrar: &mut Registrar<'_>, executor: &str) {
    ProcessCollector::describe(registrar);
    let build_info = Family::<BuildLabels, Gauge>::default();
    registrar.gauge(
        "build_info",
        &["version", "executor"],
        "Always 1; the labels say which build runs and with which executor",
        build_info.clone(),
    );
    build_info
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            executor: executor.to_owned(),
        })
        .set(1);
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::{ProcessCollector, STANDARD, Sample};

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read_from_proc() {
        let sample = Sample::read();
        for family in STANDARD {
            assert!(
                sample.get(family.figure).is_some(),
                "{family:?}: {sample:?}"
            );
        }
        assert!(sample.resident_memory.unwrap_or_default() > 1024.0 * 1024.0);
        assert!(sample.open_fds.unwrap_or_default() >= 3.0);
        assert!(sample.threads.unwrap_or_default() >= 1.0);
        let now = jiff::Timestamp::now().as_second() as f64;
        let started = sample.start_time.unwrap_or_default();
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "{started} {now}"
        );
    }

    #[test]
    fn the_standard_names_are_exposed_unprefixed() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap_or_default();
        if cfg!(target_os = "linux") {
            for name in [
                "process_cpu_seconds_total ",
                "process_resident_memory_bytes ",
                "process_virtual_memory_bytes ",
                "process_open_fds ",
                "process_start_time_seconds ",
                "process_threads ",
            ] {
                assert!(
                    text.lines().any(|line| line.starts_with(name)),
                    "{name}: {text}"
                );
            }
        }
    }

    #[test]
    fn a_figure_that_cannot_be_read_is_absent() {
        let sample = Sample {
            resident_memory: Some(2048.0),
            ..Sample::default()
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(sample)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap_or_default();
        assert!(
            text.contains("process_resident_memory_bytes 2048.0"),
            "{text}"
        );
        assert!(!text.contains("process_open_fds"), "{text}");
    }

    #[derive(Debug)]
    struct Fixed(Sample);

    impl prometheus_client::collector::Collector for Fixed {
        fn encode(
            &self,
            encoder: prometheus_client::encoding::DescriptorEncoder,
        ) -> Result<(), std::fmt::Error> {
            super::encode(&self.0, encoder)
        }
    }
}
