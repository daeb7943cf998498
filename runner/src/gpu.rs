//! GPU statistics through NVML, loaded at run time (`libnvidia-ml.so.1` through
//! libloading; the binary never links it): the devices seen at start, a sample per device
//! every few seconds, Xid critical-error events, and the run's [`GpuSummary`].
//!
//! Without NVML (library absent, init error, no device) the monitor logs one line and
//! reports nothing. Every NVML error is a missing figure, never a failed run.

use std::ffi::OsStr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use protocol::{GpuDevice, GpuSample, GpuSummary};

/// Xid codes kept in the summary.
pub const MAX_XIDS: usize = 16;

/// Running means and maxima over every sample of every device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    gpus: u32,
    rounds: u64,
    utilization: Series,
    power: Series,
    memory_used_max: Option<u64>,
    memory_total: Option<u64>,
    temperature_max: Option<f64>,
    xids: Vec<u64>,
    latest: Vec<GpuSample>,
}

/// Sum, count and maximum of one figure.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Series {
    sum: f64,
    count: u64,
    max: Option<f64>,
}

impl Series {
    fn add(&mut self, value: Option<f64>) {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            self.sum += v;
            self.count += 1;
            self.max = Some(self.max.map_or(v, |m| m.max(v)));
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

fn max_of<T: PartialOrd + Copy>(current: Option<T>, value: Option<T>) -> Option<T> {
    match (current, value) {
        (Some(c), Some(v)) => Some(if v > c { v } else { c }),
        (c, v) => c.or(v),
    }
}

impl Stats {
    /// Stats for `gpus` devices.
    #[must_use]
    pub fn new(gpus: u32) -> Self {
        Self {
            gpus,
            ..Self::default()
        }
    }

    /// Adds one sampling round (one sample per device).
    pub fn add_round(&mut self, samples: Vec<GpuSample>) {
        self.rounds += 1;
        for s in &samples {
            self.utilization.add(s.utilization_percent);
            self.power.add(s.power_watts);
            self.memory_used_max = max_of(self.memory_used_max, s.memory_used_bytes);
            self.memory_total = max_of(self.memory_total, s.memory_total_bytes);
            self.temperature_max = max_of(
                self.temperature_max,
                s.temperature_celsius.filter(|t| t.is_finite()),
            );
        }
        self.latest = samples;
    }

    /// Records an Xid error code (the first [`MAX_XIDS`] are kept).
    pub fn add_xid(&mut self, code: u64) {
        if self.xids.len() < MAX_XIDS {
            self.xids.push(code);
        }
    }

    #[must_use]
    pub fn xid_seen(&self) -> bool {
        !self.xids.is_empty()
    }

    /// The latest sample of each device, for heartbeats.
    #[must_use]
    pub fn latest(&self) -> Vec<GpuSample> {
        self.latest.clone()
    }

    /// The run's summary; `None` when there were no GPUs.
    ///
    /// Utilisation and power are means and maxima over all samples of all devices (per
    /// GPU, not summed); memory used is the highest any one device reached and memory
    /// total the largest device's.
    #[must_use]
    pub fn summary(&self) -> Option<GpuSummary> {
        (self.gpus > 0).then(|| GpuSummary {
            gpus: self.gpus,
            samples: self.rounds,
            utilization_mean_percent: self.utilization.mean(),
            utilization_max_percent: self.utilization.max,
            memory_used_max_bytes: self.memory_used_max,
            memory_total_bytes: self.memory_total,
            power_mean_watts: self.power.mean(),
            power_max_watts: self.power.max,
            temperature_max_celsius: self.temperature_max,
            xid_errors: self.xids.clone(),
        })
    }
}

/// What the monitor found at start: the devices, or why there are none.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    Devices(Vec<GpuDevice>),
    None(String),
}

impl Found {
    /// The devices found; none when NVML is missing.
    #[must_use]
    pub fn into_devices(self) -> Vec<GpuDevice> {
        match self {
            Self::Devices(devices) => devices,
            Self::None(_) => Vec::new(),
        }
    }
}

/// The sampling thread's handle: the shared [`Stats`] and a way to stop it.
#[derive(Debug)]
pub struct Monitor {
    stats: Arc<Mutex<Stats>>,
    stop: mpsc::Sender<()>,
}

impl Monitor {
    /// Starts the thread: it loads NVML from `library`, sends what it [`Found`] through
    /// `found`, then samples every `interval` until stopped. Nothing here blocks the
    /// caller on NVML.
    pub fn start(
        library: String,
        interval: Duration,
        found: impl FnOnce(Found) + Send + 'static,
    ) -> Self {
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (stop, stopped) = mpsc::channel();
        let shared = Arc::clone(&stats);
        let spawned = std::thread::Builder::new()
            .name("gpu".into())
            .spawn(move || monitor(&library, interval, found, &shared, &stopped));
        if let Err(e) = spawned {
            crate::log!("no GPU stats: cannot start the sampling thread: {e}");
        }
        Self { stats, stop }
    }

    /// The latest sample of each device.
    #[must_use]
    pub fn latest(&self) -> Vec<GpuSample> {
        self.lock().latest()
    }

    /// Stops sampling and returns the stats so far.
    #[must_use]
    pub fn finish(self) -> Stats {
        let _ = self.stop.send(());
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn monitor(
    library: &str,
    interval: Duration,
    found: impl FnOnce(Found),
    stats: &Mutex<Stats>,
    stopped: &mpsc::Receiver<()>,
) {
    let nvml = match Nvml::builder().lib_path(OsStr::new(library)).init() {
        Ok(nvml) => nvml,
        Err(e) => {
            let why = match e {
                NvmlError::LibloadingError(e) => format!("NVML not available ({e})"),
                e => format!("NVML init failed: {e}"),
            };
            crate::log!("no GPU stats: {why}");
            return found(Found::None(why));
        }
    };
    let count = match nvml.device_count() {
        Ok(0) => Err("NVML sees no GPU".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("NVML cannot count GPUs: {e}")),
    };
    let count = match count {
        Ok(n) => n,
        Err(why) => {
            crate::log!("no GPU stats: {why}");
            return found(Found::None(why));
        }
    };
    let devices: Vec<_> = (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok().map(|d| (i, d)))
        .collect();
    if devices.is_empty() {
        let why = "NVML cannot open any of its GPUs".to_owned();
        crate::log!("no GPU stats: {why}");
        return found(Found::None(why));
    }
    let described = devices
        .iter()
        .map(|(index, d)| GpuDevice {
            index: *index,
            name: d.name().ok(),
            uuid: d.uuid().ok(),
            memory_total_bytes: d.memory_info().ok().map(|m| m.total),
        })
        .collect();
    *stats.lock().unwrap_or_else(PoisonError::into_inner) = Stats::new(devices.len() as u32);
    found(Found::Devices(described));

    // Xid critical errors, where the driver supports the event.
    let mut events = nvml.create_event_set().ok();
    for (index, device) in &devices {
        let supported = device
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if let (true, Some(set)) = (supported, events.take()) {
            match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(set) => events = Some(set),
                Err(e) => crate::log!("gpu {index}: no Xid events: {e}"),
            }
        }
    }

    loop {
        let round = devices
            .iter()
            .map(|(index, device)| sample(*index, device))
            .collect();
        stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add_round(round);
        let next = Instant::now() + interval;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            let slice = left.min(Duration::from_millis(500));
            if let Some(set) = &events {
                if let Ok(event) = set.wait(slice.as_millis() as u32)
                    && let Some(XidError::Value(code)) = event.event_data
                {
                    crate::log!("gpu: Xid {code} reported by NVML");
                    stats
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .add_xid(code);
                }
                match stopped.try_recv() {
                    Err(mpsc::TryRecvError::Empty) => {}
                    _ => return,
                }
            } else {
                match stopped.recv_timeout(slice) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
            if Instant::now() >= next {
                break;
            }
        }
    }
}

fn sample(index: u32, device: &nvml_wrapper::Device<'_>) -> GpuSample {
    let memory = device.memory_info().ok();
    GpuSample {
        index,
        utilization_percent: device.utilization_rates().ok().map(|u| f64::from(u.gpu)),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
        temperature_celsius: device
            .temperature(TemperatureSensor::Gpu)
            .ok()
            .map(f64::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(index: u32, util: f64, used: u64, power: f64, temp: f64) -> GpuSample {
        GpuSample {
            index,
            utilization_percent: Some(util),
            memory_used_bytes: Some(used),
            memory_total_bytes: Some(80 << 30),
            power_watts: Some(power),
            temperature_celsius: Some(temp),
        }
    }

    #[test]
    fn no_gpus_no_summary() {
        assert_eq!(Stats::default().summary(), None);
        assert_eq!(Stats::new(0).summary(), None);
    }

    #[test]
    fn means_and_maxima_over_all_samples_of_all_devices() {
        let mut stats = Stats::new(2);
        stats.add_round(vec![
            sample(0, 10.0, 1 << 30, 100.0, 50.0),
            sample(1, 30.0, 3 << 30, 200.0, 60.0),
        ]);
        stats.add_round(vec![
            sample(0, 50.0, 2 << 30, 300.0, 70.0),
            sample(1, 90.0, 1 << 30, 400.0, 55.0),
        ]);
        stats.add_xid(79);
        let s = stats.summary().unwrap();
        assert_eq!(s.gpus, 2);
        assert_eq!(s.samples, 2);
        assert_eq!(s.utilization_mean_percent, Some(45.0));
        assert_eq!(s.utilization_max_percent, Some(90.0));
        assert_eq!(s.memory_used_max_bytes, Some(3 << 30));
        assert_eq!(s.memory_total_bytes, Some(80 << 30));
        assert_eq!(s.power_mean_watts, Some(250.0));
        assert_eq!(s.power_max_watts, Some(400.0));
        assert_eq!(s.temperature_max_celsius, Some(70.0));
        assert_eq!(s.xid_errors, vec![79]);
        assert_eq!(stats.latest()[1].utilization_percent, Some(90.0));
    }

    #[test]
    fn missing_figures_are_skipped_not_zero() {
        let mut stats = Stats::new(1);
        stats.add_round(vec![GpuSample {
            index: 0,
            utilization_percent: None,
            power_watts: Some(f64::NAN),
            ..GpuSample::default()
        }]);
        stats.add_round(vec![GpuSample {
            index: 0,
            utilization_percent: Some(20.0),
            ..GpuSample::default()
        }]);
        let s = stats.summary().unwrap();
        assert_eq!(s.samples, 2);
        assert_eq!(s.utilization_mean_percent, Some(20.0));
        assert_eq!(s.power_mean_watts, None);
        assert_eq!(s.memory_used_max_bytes, None);
    }

    #[test]
    fn xids_are_bounded_and_ordered() {
        let mut stats = Stats::new(1);
        assert!(!stats.xid_seen());
        for code in 0..40 {
            stats.add_xid(code);
        }
        assert!(stats.xid_seen());
        let xids = stats.summary().unwrap().xid_errors;
        assert_eq!(xids, (0..MAX_XIDS as u64).collect::<Vec<_>>());
    }

    #[test]
    fn an_absent_library_is_found_as_none() {
        let (tx, rx) = mpsc::channel();
        let monitor = Monitor::start(
            "/nonexistent/libnvidia-ml.so.1".into(),
            Duration::from_secs(1),
            move |found| tx.send(found).unwrap(),
        );
        let found = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(found, Found::None(why) if why.contains("NVML not available")));
        assert_eq!(monitor.finish().summary(), None);
    }
}
