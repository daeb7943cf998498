//! Why a command failed: the pure [`classify`] function over what the runner observed,
//! and the cgroup OOM-kill counter that tells a host OOM from any other SIGKILL.

use std::path::Path;

use protocol::FailureClass;

/// SIGKILL's number on Linux.
const SIGKILL: i32 = 9;

/// What the runner saw of one run, the input of [`classify`].
// Independent facts, each read once by `classify`; an enum would hide none of them.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observations {
    /// The exit code when the command exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
    /// The runner sent SIGTERM because the task's timeout passed.
    pub timed_out: bool,
    /// NVML reported an Xid critical error during the run.
    pub gpu_xid: bool,
    /// The command's output matched a CUDA out-of-memory pattern.
    pub cuda_oom: bool,
    /// The cgroup's OOM-kill counter grew during the run; `None` when it cannot be read.
    pub oom_kills_grew: Option<bool>,
    /// A terminating signal from outside (SIGTERM, SIGINT, SIGHUP, SIGQUIT) was
    /// forwarded to the command.
    pub signal_forwarded: bool,
}

impl Observations {
    /// The command exited with 0.
    #[must_use]
    pub fn succeeded(&self) -> bool {
        self.signal.is_none() && self.exit_code == Some(0)
    }

    /// The exit code the runner reports and exits with: the command's, or 128 + signal.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match (self.signal, self.exit_code) {
            (Some(signal), _) => 128 + signal,
            (None, Some(code)) => code,
            (None, None) => 1,
        }
    }
}

/// The failure class of a run; `None` on success. Precedence: timeout > gpu_xid >
/// cuda_oom > host_oom > signal > user_error.
///
/// - host_oom needs the command SIGKILLed (or a shell reporting exit 137 for it) and the
///   cgroup's `oom_kill` counter grown; an unreadable counter never means host_oom;
/// - signal covers a command ended by a signal and a command that exited non-zero after
///   the runner forwarded it a terminating signal from outside (eviction, cancel).
#[must_use]
pub fn classify(o: &Observations) -> Option<FailureClass> {
    let killed = o.signal == Some(SIGKILL) || (o.signal.is_none() && o.exit_code == Some(137));
    if o.succeeded() {
        None
    } else if o.timed_out {
        Some(FailureClass::Timeout)
    } else if o.gpu_xid {
        Some(FailureClass::GpuXid)
    } else if o.cuda_oom {
        Some(FailureClass::CudaOom)
    } else if killed && o.oom_kills_grew == Some(true) {
        Some(FailureClass::HostOom)
    } else if o.signal.is_some() || o.signal_forwarded {
        Some(FailureClass::Signal)
    } else {
        Some(FailureClass::UserError)
    }
}

/// The value of `key` in a `key value` per line file (`memory.events`,
/// `memory.oom_control`).
#[must_use]
pub fn parse_counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once(char::is_whitespace)?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The cgroup v2 path of this process from `/proc/self/cgroup` (`0::/path`).
fn cgroup_v2_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim)
}

/// How many processes of this cgroup the OOM killer has killed so far, under the cgroup
/// mount `root` (normally `/sys/fs/cgroup`): cgroup v2's `memory.events` (of our own
/// cgroup, then of the mount's root, which is ours inside a cgroup namespace), else cgroup
/// v1's `memory/memory.oom_control`. `None` when none of them can be read.
#[must_use]
pub fn oom_kill_count(root: &Path, proc_self_cgroup: Option<&str>) -> Option<u64> {
    let own = proc_self_cgroup
        .and_then(cgroup_v2_path)
        .map(|p| root.join(p.trim_start_matches('/')).join("memory.events"));
    let candidates = own.into_iter().chain([
        root.join("memory.events"),
        root.join("memory").join("memory.oom_control"),
    ]);
    for path in candidates {
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Some(count) = parse_counter(&text, "oom_kill")
        {
            return Some(count);
        }
    }
    None
}

/// [`oom_kill_count`] of this process, from the real `/sys/fs/cgroup`.
#[must_use]
pub fn current_oom_kill_count() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok();
    oom_kill_count(Path::new("/sys/fs/cgroup"), own.as_deref())
}

/// Whether the counter grew between two readings; `None` when either is unknown.
#[must_use]
pub fn grew(before: Option<u64>, after: Option<u64>) -> Option<bool> {
    Some(after? > before?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fluent fixture: `Obs::exit(1).oom().obs()`.
    struct Obs(Observations);

    impl Obs {
        fn exit(code: i32) -> Self {
            Self(Observations {
                exit_code: Some(code),
                ..Observations::default()
            })
        }
        fn signal(signal: i32) -> Self {
            Self(Observations {
                signal: Some(signal),
                ..Observations::default()
            })
        }
        fn timed_out(mut self) -> Self {
            self.0.timed_out = true;
            self
        }
        fn xid(mut self) -> Self {
            self.0.gpu_xid = true;
            self
        }
        fn cuda_oom(mut self) -> Self {
            self.0.cuda_oom = true;
            self
        }
        fn oom_kills(mut self, grew: Option<bool>) -> Self {
            self.0.oom_kills_grew = grew;
            self
        }
        fn forwarded(mut self) -> Self {
            self.0.signal_forwarded = true;
            self
        }
        fn class(&self) -> Option<FailureClass> {
            classify(&self.0)
        }
    }

    #[test]
    fn success_has_no_class_whatever_else_was_seen() {
        assert_eq!(Obs::exit(0).class(), None);
        assert_eq!(
            Obs::exit(0)
                .timed_out()
                .xid()
                .cuda_oom()
                .forwarded()
                .class(),
            None
        );
    }

    #[test]
    fn precedence_table() {
        use FailureClass::*;
        let cases = [
            (Obs::exit(1), Some(UserError)),
            (Obs::exit(143).timed_out(), Some(Timeout)),
            (Obs::signal(9).timed_out().xid().cuda_oom(), Some(Timeout)),
            (Obs::exit(1).xid().cuda_oom(), Some(GpuXid)),
            (Obs::exit(1).cuda_oom().oom_kills(Some(true)), Some(CudaOom)),
            (Obs::signal(9).oom_kills(Some(true)), Some(HostOom)),
            (Obs::exit(137).oom_kills(Some(true)), Some(HostOom)),
            (Obs::signal(9).oom_kills(Some(false)), Some(Signal)),
            (Obs::signal(9).oom_kills(None), Some(Signal)),
            (Obs::signal(15).oom_kills(Some(true)), Some(Signal)),
            (Obs::exit(1).oom_kills(Some(true)), Some(UserError)),
            (Obs::exit(143).forwarded(), Some(Signal)),
            (Obs::exit(137), Some(UserError)),
        ];
        for (i, (obs, want)) in cases.iter().enumerate() {
            assert_eq!(obs.class(), *want, "case {i}: {:?}", obs.0);
        }
    }

    #[test]
    fn exit_code_is_the_commands_or_128_plus_signal() {
        assert_eq!(Obs::exit(3).0.exit_code(), 3);
        assert_eq!(Obs::signal(9).0.exit_code(), 137);
        assert_eq!(Obs::signal(15).0.exit_code(), 143);
    }

    #[test]
    fn counters_parse_from_v1_and_v2_files() {
        let v2 = "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_counter(v2, "oom_kill"), Some(1));
        assert_eq!(parse_counter(v2, "oom"), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n";
        assert_eq!(parse_counter(v1, "oom_kill"), Some(7));
        assert_eq!(parse_counter("oom_kill x\n", "oom_kill"), None);
        assert_eq!(parse_counter("", "oom_kill"), None);
    }

    #[test]
    fn counter_is_read_from_the_first_file_that_exists() {
        let root = std::env::temp_dir().join(format!("runner-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("memory")).unwrap();
        assert_eq!(oom_kill_count(&root, None), None);
        std::fs::write(root.join("memory/memory.oom_control"), "oom_kill 3\n").unwrap();
        assert_eq!(oom_kill_count(&root, None), Some(3));
        std::fs::write(root.join("memory.events"), "oom 1\noom_kill 4\n").unwrap();
        assert_eq!(oom_kill_count(&root, Some("0::/\n")), Some(4));
        std::fs::create_dir_all(root.join("kubepods/pod1")).unwrap();
        std::fs::write(root.join("kubepods/pod1/memory.events"), "oom_kill 5\n").unwrap();
        assert_eq!(
            oom_kill_count(&root, Some("1:name=systemd:/x\n0::/kubepods/pod1\n")),
            Some(5)
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn growth_is_unknown_without_both_readings() {
        assert_eq!(grew(Some(1), Some(2)), Some(true));
        assert_eq!(grew(Some(2), Some(2)), Some(false));
        assert_eq!(grew(None, Some(2)), None);
        assert_eq!(grew(Some(1), None), None);
    }
}
