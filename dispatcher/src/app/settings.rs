//! The library's configuration structs built from the parsed flags and the placement
//! catalog. Pure: no I/O, so a test shows that the flags' defaults are the library's.

use std::time::Duration;

use crate::api::ReportLimits;
use crate::config::ServeArgs;
use crate::launcher::job_spec::{LaunchConfig, RunnerInjection};
use crate::metrics::snapshot::SnapshotConfig;
use crate::placement::PlacementCatalog;
use crate::store::ReportAllowance;
use crate::task::retry::RetryDefaults;
use crate::task::submission::{Limits, ShmRule};
use crate::task::webhook::Destinations;
use crate::watcher::lease::{LeaseConfig, TimingError};
use crate::webhooks::DeliverySettings;

/// What submissions are checked against.
pub(super) fn limits(args: &ServeArgs, catalog: &PlacementCatalog) -> Limits {
    let submissions = &args.submissions;
    Limits {
        gpu_classes: catalog.gpu_classes.capacities(),
        label_prefixes: submissions.tenant_label_prefixes.clone(),
        annotation_prefixes: submissions.tenant_annotation_prefixes.clone(),
        max_cpu: submissions.max_task_cpu,
        max_memory: submissions.max_task_memory,
        max_gpus: submissions.max_task_gpus,
        max_shm: submissions.max_task_shm,
        max_queue_ttl_seconds: submissions.max_task_queue_ttl_seconds,
        volume_claims: catalog.volume_claims.clone(),
        shm_rule: ShmRule {
            fraction: args.placement.shm_fraction,
            cap: args.placement.shm_cap,
            without_memory_request: args.placement.shm_without_memory,
        },
        webhook_destinations: webhook_destinations(args),
        queues: declared_queues(&submissions.queues),
        ..Limits::default()
    }
}

/// The queues of `--queues`, with the default queue (where tasks naming none land)
/// among them; none declared: any queue.
fn declared_queues(declared: &[String]) -> std::collections::BTreeSet<String> {
    if declared.is_empty() {
        return std::collections::BTreeSet::new();
    }
    declared
        .iter()
        .cloned()
        .chain([crate::task::submission::DEFAULT_QUEUE.to_owned()])
        .collect()
}

/// Where webhooks may point: the hosts of `--webhook-allowed-hosts` (lowercase, IPv6
/// without brackets), or any public address without it.
pub(super) fn webhook_destinations(args: &ServeArgs) -> Destinations {
    let hosts: Vec<String> = args
        .webhooks
        .webhook_allowed_hosts
        .iter()
        .map(|host| {
            host.trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase()
        })
        .filter(|host| !host.is_empty())
        .collect();
    Destinations {
        allowed_hosts: (!hosts.is_empty()).then_some(hosts),
    }
}

/// How webhook deliveries are sent and retried; fails when `--webhook-ca-file` cannot be
/// read or holds no certificate.
pub(super) fn delivery_settings(args: &ServeArgs) -> anyhow::Result<DeliverySettings> {
    let webhooks = &args.webhooks;
    let extra_roots = match &webhooks.webhook_ca_file {
        None => Vec::new(),
        Some(path) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject as _;
            let roots = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| anyhow::anyhow!("--webhook-ca-file {}: {e}", path.display()))?;
            anyhow::ensure!(
                !roots.is_empty(),
                "--webhook-ca-file {}: no PEM certificate in it",
                path.display()
            );
            roots
        }
    };
    Ok(DeliverySettings {
        destinations: webhook_destinations(args),
        timeout: webhooks.webhook_timeout.max(Duration::from_secs(1)),
        retry_for: webhooks.webhook_retry_for,
        backoff: webhooks.webhook_backoff.max(Duration::from_secs(1)),
        extra_roots,
    })
}

/// What the report endpoint takes from one task attempt.
pub(super) fn report_limits(args: &ServeArgs) -> ReportLimits {
    ReportLimits {
        allowance: ReportAllowance {
            max_reports: args.runner.max_reports_per_attempt,
            max_bytes: args.runner.max_report_bytes_per_attempt,
            after_end: jiff::SignedDuration::try_from(args.runner.reports_after_end)
                .unwrap_or(jiff::SignedDuration::MAX),
        },
        max_cost_usd: args.runner.max_report_cost_usd,
        max_log_bytes: args.runner.max_log_bytes_per_attempt,
    }
}

/// Checks the flags that must agree with each other: shm is memory, so no task may ask
/// for more shm than memory, and the shm a task gets without asking is within what it
/// could ask for.
pub(super) fn check(args: &ServeArgs) -> Result<(), String> {
    let submissions = &args.submissions;
    if submissions.max_task_shm > submissions.max_task_memory {
        return Err(format!(
            "--max-task-shm {} is more than --max-task-memory {}: /dev/shm is memory",
            submissions.max_task_shm, submissions.max_task_memory
        ));
    }
    for (flag, size) in [
        ("--shm-cap", args.placement.shm_cap),
        ("--shm-without-memory", args.placement.shm_without_memory),
    ] {
        if size > submissions.max_task_shm {
            return Err(format!(
                "{flag} {size} is more than --max-task-shm {}",
                submissions.max_task_shm
            ));
        }
    }
    Ok(())
}

/// The retry defaults of the flags, growing memory after `oom` never past what one task
/// may request (a larger retry could never be scheduled).
pub(super) fn retry_defaults(args: &ServeArgs) -> RetryDefaults {
    let defaults = args.retry.defaults();
    RetryDefaults {
        max_memory: defaults.max_memory.min(args.submissions.max_task_memory),
        ..defaults
    }
}

/// What every Job is built with.
pub(super) fn launch_config(args: &ServeArgs, catalog: &PlacementCatalog) -> LaunchConfig {
    LaunchConfig {
        namespace: args.namespace.clone(),
        gpu_classes: catalog.gpu_classes.clone(),
        ttl_after_finished: args.job_ttl_seconds,
        run_as_user: args.run_as_user,
        kueue_queue_name: args.kueue_queue_name.clone(),
        runner: RunnerInjection {
            image: args.runner.runner_image.clone(),
            image_pull_policy: args.runner.runner_image_pull_policy,
            heartbeat: args.runner.heartbeat_seconds,
        },
        scratch_storage_class: args.placement.scratch_storage_class.clone(),
    }
}

/// What `/metrics` reads the store with; a task counts as stale-launching four times
/// later than the launcher relaunches it, and never before a minute.
pub(super) fn snapshot_config(args: &ServeArgs) -> SnapshotConfig {
    SnapshotConfig {
        max_age: args.cost.metrics_snapshot_max_age,
        queued_too_long: args.cost.queued_too_long_after,
        launching_stale: (args.launching_stale_after * 4).max(Duration::from_mins(1)),
        cost_rate_alert_dollars_per_hour: args.cost.cost_rate_alert_dollars_per_hour,
    }
}

/// The watcher's leader lease; fails when its durations do not fit together.
pub(super) fn lease(args: &ServeArgs, instance: &str) -> Result<LeaseConfig, TimingError> {
    Ok(LeaseConfig {
        name: args.lease.lease_name.clone(),
        namespace: args
            .lease
            .lease_namespace
            .clone()
            .unwrap_or_else(|| args.namespace.clone()),
        identity: instance.to_owned(),
        timing: args.lease.timing()?,
    })
}

/// This process's identity: `--instance`, else `dispatcher-` and 8 random hex digits.
pub(super) fn instance(args: &ServeArgs) -> String {
    args.instance.clone().unwrap_or_else(|| {
        format!(
            "dispatcher-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser as _;

    use super::{
        check, instance, launch_config, lease, limits, report_limits, retry_defaults,
        snapshot_config,
    };
    use crate::api::ReportLimits;
    use crate::config::{Cli, Command, ServeArgs};
    use crate::launcher::job_spec::LaunchConfig;
    use crate::metrics::snapshot::SnapshotConfig;
    use crate::placement::PlacementCatalog;
    use crate::task::submission::Limits;

    fn serve(args: &[&str]) -> ServeArgs {
        match Cli::try_parse_from([&["dispatcher", "serve"], args].concat())
            .unwrap()
            .command
        {
            Command::Serve(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_default_flags_give_the_library_defaults() {
        let args = serve(&[]);
        let catalog = PlacementCatalog::default();
        assert_eq!(launch_config(&args, &catalog), LaunchConfig::default());
        assert_eq!(limits(&args, &catalog), Limits::default());
        assert_eq!(report_limits(&args), ReportLimits::default());
        let snapshot = snapshot_config(&args);
        assert_eq!(snapshot.max_age, SnapshotConfig::default().max_age);
        assert_eq!(
            snapshot.queued_too_long,
            SnapshotConfig::default().queued_too_long
        );
    }

    #[test]
    fn the_task_maxima_reach_the_limits_and_agree() {
        let args = serve(&[
            "--max-task-cpu",
            "8",
            "--max-task-memory",
            "64Gi",
            "--max-task-gpus",
            "4",
            "--max-task-shm",
            "32Gi",
            "--tenant-label-prefixes",
            "example.com/,team.example.com/",
        ]);
        let limits_of = |args: &ServeArgs| limits(args, &PlacementCatalog::default());
        let limits = limits_of(&args);
        assert_eq!(limits.max_cpu.to_string(), "8");
        assert_eq!(limits.max_memory.to_string(), "64Gi");
        assert_eq!(
            (limits.max_gpus, limits.max_shm.to_string()),
            (4, "32Gi".to_owned())
        );
        assert_eq!(limits.label_prefixes.len(), 2);
        assert!(limits.annotation_prefixes.is_empty());
        assert!(limits.queues.is_empty(), "no --queues: any queue");
        // Declared queues always hold the default queue, where tasks naming none land.
        let declared = limits_of(&serve(&["--queues", "gpu"]));
        assert_eq!(
            declared
                .queues
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["default", "gpu"]
        );
        assert_eq!(check(&args), Ok(()));
        // A retry after oom grows memory at most to the task maximum.
        assert_eq!(retry_defaults(&args).max_memory.to_string(), "64Gi");
        let too_much_shm = serve(&["--max-task-memory", "8Gi", "--max-task-shm", "16Gi"]);
        assert!(check(&too_much_shm).unwrap_err().contains("--max-task-shm"));
        let default_shm_too_big = serve(&["--max-task-shm", "8Gi"]);
        assert!(
            check(&default_shm_too_big)
                .unwrap_err()
                .starts_with("--shm-cap 16Gi")
        );
        assert_eq!(check(&serve(&[])), Ok(()));
        for bad in [
            ["--tenant-annotation-prefixes", "kueue.x-k8s.io/"],
            ["--tenant-label-prefixes", "agent-bus.io/"],
            ["--tenant-label-prefixes", "team"],
            ["--max-task-gpus", "0"],
            ["--max-task-cpu", "lots"],
        ] {
            let error = Cli::try_parse_from([&["dispatcher", "serve"][..], &bad].concat())
                .unwrap_err()
                .to_string();
            assert!(error.contains(bad[0]), "{bad:?}: {error}");
        }
    }

    #[test]
    fn launching_stale_is_four_relaunch_periods_and_at_least_a_minute() {
        let stale = |after: &str| {
            snapshot_config(&serve(&["--launching-stale-after", after])).launching_stale
        };
        assert_eq!(stale("5"), Duration::from_mins(1));
        assert_eq!(stale("1m"), Duration::from_mins(4));
    }

    #[test]
    fn the_lease_is_in_the_tasks_namespace_unless_said_otherwise() {
        let args = serve(&["--namespace", "jobs", "--instance", "one"]);
        assert_eq!(instance(&args), "one");
        let lease_config = lease(&args, &instance(&args)).unwrap();
        assert_eq!(lease_config.namespace, "jobs");
        assert_eq!(lease_config.identity, "one");
        let args = serve(&["--lease-namespace", "system"]);
        assert_eq!(lease(&args, "x").unwrap().namespace, "system");
        assert!(instance(&args).starts_with("dispatcher-"));
        assert_eq!(instance(&args).len(), "dispatcher-".len() + 8);
    }

    #[test]
    fn the_lease_durations_are_client_go_s_and_checked() {
        let timing = lease(&serve(&[]), "x").unwrap().timing;
        assert_eq!(timing, crate::watcher::lease::Timing::default());
        assert_eq!(timing.duration(), Duration::from_secs(15));
        assert_eq!(timing.renew_deadline(), Duration::from_secs(10));
        assert_eq!(timing.retry_period(), Duration::from_secs(2));
        let timing = lease(
            &serve(&[
                "--lease-duration",
                "1m",
                "--lease-renew-deadline",
                "40s",
                "--lease-retry-period",
                "5s",
            ]),
            "x",
        )
        .unwrap()
        .timing;
        assert_eq!(timing.duration(), Duration::from_mins(1));
        let error = lease(&serve(&["--lease-renew-deadline", "20s"]), "x").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--lease-renew-deadline 20s must be less than --lease-duration 15s"),
            "{error}"
        );
        let error = lease(&serve(&["--lease-retry-period", "10s"]), "x").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("--lease-retry-period 10s must be less than"),
            "{error}"
        );
    }
}
