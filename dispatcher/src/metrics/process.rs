//! This process: its resident memory and open descriptors (read from `/proc/self` at
//! scrape time, Linux only) and which build runs with which executor.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::registry::Registrar;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    executor: String,
}

#[derive(Debug)]
pub(super) struct ProcessFamilies {
    resident_memory: Gauge,
    open_fds: Gauge,
    build_info: Family<BuildLabels, Gauge>,
}

impl ProcessFamilies {
    /// Registers the families, `build_info` set for `executor`.
    pub(super) fn register(registrar: &mut Registrar<'_>, executor: &str) -> Self {
        let families = Self {
            resident_memory: Gauge::default(),
            open_fds: Gauge::default(),
            build_info: Family::default(),
        };
        registrar.gauge(
            "process_resident_memory_bytes",
            &[],
            "Resident memory of this process",
            families.resident_memory.clone(),
        );
        registrar.gauge(
            "process_open_fds",
            &[],
            "Open file descriptors of this process",
            families.open_fds.clone(),
        );
        registrar.gauge(
            "build_info",
            &["version", "executor"],
            "Always 1; the labels say which build runs and with which executor",
            families.build_info.clone(),
        );
        families
            .build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                executor: executor.to_owned(),
            })
            .set(1);
        families
    }

    /// Reads resident memory and open descriptors from `/proc/self`; elsewhere leaves
    /// them as they are.
    pub(super) fn refresh(&self) {
        if let Ok(status) = std::fs::read_to_string("/proc/self/status")
            && let Some(kib) = status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<i64>().ok())
        {
            self.resident_memory.set(kib * 1024);
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds
                .set(i64::try_from(entries.count()).unwrap_or(i64::MAX));
        }
    }

    #[cfg(test)]
    pub(super) fn set_for_test(&self, resident_memory: i64, open_fds: i64) {
        self.resident_memory.set(resident_memory);
        self.open_fds.set(open_fds);
    }
}
