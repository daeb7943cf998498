use std::time::Duration;

use super::{
    AttemptFailure, Current, DecidedBy, Factor, FailureClass, Mutation, RetryAction, RetryCount,
    RetryDefaults, RetryPolicy, RetryRule, Verdict, backoff, jitter_seed, judge, plan_changes,
};
use crate::placement::GpuClasses;
use crate::task::Memory;

fn failure(class: FailureClass, exit_code: Option<i32>) -> AttemptFailure {
    AttemptFailure {
        class,
        exit_code,
        node: Some("gpu-a100-0".to_owned()),
    }
}

fn used(counted: u32, ignored: u32) -> RetryCount {
    RetryCount { counted, ignored }
}

fn rule(action: RetryAction, codes: &[i32], classes: &[FailureClass]) -> RetryRule {
    RetryRule {
        action,
        on_exit_codes: codes.to_vec(),
        on_failure_classes: classes.to_vec(),
        mutate: Mutation::default(),
    }
}

/// A row of the verdict table: (policy, failure, max_retries, used) → (action, decided by).
type Row<'a> = (
    Option<&'a RetryPolicy>,
    AttemptFailure,
    u32,
    RetryCount,
    RetryAction,
    DecidedBy,
);

fn action(verdict: &Verdict) -> (RetryAction, DecidedBy) {
    match verdict {
        Verdict::Retry { by, .. } | Verdict::Fail { by, .. } => (verdict.action(), *by),
    }
}

#[test]
fn verdicts_follow_the_first_matching_rule_then_the_defaults() {
    let defaults = RetryDefaults::default();
    let fail_fast = RetryPolicy {
        rules: vec![
            rule(RetryAction::Fail, &[2], &[]),
            rule(RetryAction::Ignore, &[75], &[FailureClass::ExitCode]),
            rule(RetryAction::Retry, &[], &[FailureClass::Evicted]),
        ],
        ..RetryPolicy::default()
    };
    let exit = |code| failure(FailureClass::ExitCode, Some(code));
    // (policy, failure, max_retries, used) → (action, decided by)
    let table: Vec<Row<'_>> = vec![
        // No rule: failures retry while retries are left.
        (
            None,
            exit(7),
            2,
            used(0, 0),
            RetryAction::Retry,
            DecidedBy::NoRule,
        ),
        (
            None,
            exit(7),
            2,
            used(1, 0),
            RetryAction::Retry,
            DecidedBy::NoRule,
        ),
        (
            None,
            exit(7),
            2,
            used(2, 0),
            RetryAction::Fail,
            DecidedBy::NoRule,
        ),
        (
            None,
            exit(7),
            0,
            used(0, 0),
            RetryAction::Fail,
            DecidedBy::NoRule,
        ),
        // The task's rules come first, in order.
        (
            Some(&fail_fast),
            exit(2),
            3,
            used(0, 0),
            RetryAction::Fail,
            DecidedBy::Task(0),
        ),
        (
            Some(&fail_fast),
            exit(75),
            3,
            used(0, 0),
            RetryAction::Ignore,
            DecidedBy::Task(1),
        ),
        (
            Some(&fail_fast),
            exit(3),
            3,
            used(0, 0),
            RetryAction::Retry,
            DecidedBy::NoRule,
        ),
        // A task rule overrides the default for the same class: evictions counted.
        (
            Some(&fail_fast),
            failure(FailureClass::Evicted, None),
            1,
            used(0, 0),
            RetryAction::Retry,
            DecidedBy::Task(2),
        ),
        (
            Some(&fail_fast),
            failure(FailureClass::Evicted, None),
            0,
            used(0, 0),
            RetryAction::Fail,
            DecidedBy::Task(2),
        ),
        // Defaults: disruptions are free even without retries; launch refusals fail.
        (
            None,
            failure(FailureClass::Evicted, None),
            0,
            used(0, 0),
            RetryAction::Ignore,
            DecidedBy::Default(0),
        ),
        (
            None,
            failure(FailureClass::JobLost, None),
            0,
            used(0, 9),
            RetryAction::Ignore,
            DecidedBy::Default(0),
        ),
        // …until the free ones are used up: then they count.
        (
            None,
            failure(FailureClass::JobLost, None),
            0,
            used(0, 10),
            RetryAction::Fail,
            DecidedBy::Default(0),
        ),
        (
            None,
            failure(FailureClass::JobLost, None),
            1,
            used(0, 10),
            RetryAction::Retry,
            DecidedBy::Default(0),
        ),
        (
            None,
            failure(FailureClass::Oom, Some(137)),
            1,
            used(0, 0),
            RetryAction::Retry,
            DecidedBy::Default(1),
        ),
        (
            None,
            failure(FailureClass::CudaOom, Some(1)),
            1,
            used(0, 0),
            RetryAction::Retry,
            DecidedBy::Default(2),
        ),
        (
            None,
            failure(FailureClass::Xid, Some(1)),
            1,
            used(0, 0),
            RetryAction::Retry,
            DecidedBy::Default(3),
        ),
        (
            None,
            failure(FailureClass::LaunchRejected, None),
            5,
            used(0, 0),
            RetryAction::Fail,
            DecidedBy::Default(4),
        ),
        (
            None,
            failure(FailureClass::ImagePull, None),
            5,
            used(0, 0),
            RetryAction::Fail,
            DecidedBy::Default(4),
        ),
    ];
    for (policy, failure, max_retries, count, want, by) in table {
        let verdict = judge(policy, &defaults, &failure, max_retries, count);
        assert_eq!(
            action(&verdict),
            (want, by),
            "{failure:?} max_retries {max_retries} used {count:?}: {verdict:?}"
        );
    }
}

#[test]
fn a_rule_with_codes_and_classes_needs_both() {
    let both = rule(RetryAction::Fail, &[3], &[FailureClass::ExitCode]);
    assert!(both.matches(&failure(FailureClass::ExitCode, Some(3))));
    assert!(!both.matches(&failure(FailureClass::Signal, Some(3))));
    assert!(!both.matches(&failure(FailureClass::ExitCode, Some(4))));
    assert!(!both.matches(&failure(FailureClass::ExitCode, None)));
    assert!(rule(RetryAction::Fail, &[], &[]).matches(&failure(FailureClass::Xid, None)));
}

#[test]
fn backoff_doubles_is_capped_and_jittered_into_the_upper_half() {
    let defaults = RetryDefaults::default();
    let policy = RetryPolicy {
        backoff_seconds: Some(10),
        max_backoff_seconds: Some(60),
        rules: Vec::new(),
    };
    for (retries, full) in [(0, 10), (1, 20), (2, 40), (3, 60), (4, 60), (40, 60)] {
        for seed in [0, 1, 7, 4_999, 5_000, u64::MAX] {
            let wait = backoff(Some(&policy), &defaults, retries, seed);
            let full = Duration::from_secs(full);
            assert!(
                wait <= full && wait >= full / 2,
                "{retries} {seed}: {wait:?}"
            );
        }
    }
    // The operator's defaults apply without a policy, and no backoff is no wait.
    assert!(backoff(None, &defaults, 0, 3) >= Duration::from_secs(5));
    let immediate = RetryPolicy {
        backoff_seconds: Some(0),
        ..RetryPolicy::default()
    };
    assert_eq!(backoff(Some(&immediate), &defaults, 3, 99), Duration::ZERO);
}

#[test]
fn jitter_is_stable_and_spreads() {
    let id = [7u8; 16];
    assert_eq!(jitter_seed(&id, 1), jitter_seed(&id, 1));
    assert_ne!(jitter_seed(&id, 1), jitter_seed(&id, 2));
    assert_ne!(jitter_seed(&id, 1), jitter_seed(&[8u8; 16], 1));
}

fn mutation(factor: Option<f64>, next_class: bool, avoid: bool) -> Mutation {
    Mutation {
        memory_factor: factor.and_then(Factor::new),
        next_gpu_class: next_class,
        avoid_failed_node: avoid,
    }
}

fn current<'a>(
    memory: Option<&str>,
    gpu: Option<(&'a str, u32)>,
    avoided: &'a [String],
) -> Current<'a> {
    Current {
        memory: memory.map(|m| m.parse::<Memory>().unwrap()),
        gpu,
        avoided_nodes: avoided,
    }
}

#[test]
fn memory_grows_by_the_factor_up_to_the_maximum() {
    let defaults = RetryDefaults {
        max_memory: "3Gi".parse().unwrap(),
        ..RetryDefaults::default()
    };
    let classes = GpuClasses::default();
    let oom = failure(FailureClass::Oom, Some(137));
    let grow = mutation(Some(1.5), false, false);
    let changes = plan_changes(
        &grow,
        &oom,
        current(Some("1Gi"), None, &[]),
        &defaults,
        &classes,
    );
    assert_eq!(changes.memory, Some("1536Mi".parse().unwrap()));
    assert_eq!(changes.notes, ["memory 1Gi → 1536Mi (oom, ×1.5)"]);
    let capped = plan_changes(
        &grow,
        &oom,
        current(Some("2560Mi"), None, &[]),
        &defaults,
        &classes,
    );
    assert_eq!(capped.memory, Some("3Gi".parse().unwrap()));
    let at_max = plan_changes(
        &grow,
        &oom,
        current(Some("3Gi"), None, &[]),
        &defaults,
        &classes,
    );
    assert_eq!(at_max.memory, None);
    assert!(
        at_max.notes[0].starts_with("memory stays 3Gi"),
        "{:?}",
        at_max.notes
    );
    let unset = plan_changes(&grow, &oom, current(None, None, &[]), &defaults, &classes);
    assert_eq!(unset.memory, None);
    assert!(unset.notes[0].contains("requests none"));
}

#[test]
fn cuda_oom_moves_up_the_memory_order_where_the_gpus_fit() {
    let defaults = RetryDefaults::default();
    let classes = GpuClasses::default();
    let cuda = failure(FailureClass::CudaOom, Some(1));
    let next = mutation(None, true, false);
    let moved = |class, count| {
        plan_changes(
            &next,
            &cuda,
            current(None, Some((class, count)), &[]),
            &defaults,
            &classes,
        )
        .gpu_class
    };
    assert_eq!(moved("v100", 1).as_deref(), Some("a100"));
    assert_eq!(moved("a100-mig-1g.10gb", 1).as_deref(), Some("v100"));
    assert_eq!(moved("a100-mig-1g.10gb", 8).as_deref(), Some("v100"));
    assert_eq!(moved("a100", 8).as_deref(), Some("h100"));
    assert_eq!(moved("h100", 1), None);
    let none = plan_changes(&next, &cuda, current(None, None, &[]), &defaults, &classes);
    assert_eq!(none.gpu_class, None);
    assert!(none.notes[0].contains("no GPUs"));
}

#[test]
fn a_hardware_failure_adds_its_node_to_the_avoided_ones() {
    let defaults = RetryDefaults::default();
    let classes = GpuClasses::default();
    let xid = failure(FailureClass::Xid, Some(1));
    let avoid = mutation(None, false, true);
    let changes = plan_changes(&avoid, &xid, current(None, None, &[]), &defaults, &classes);
    assert_eq!(changes.avoid_nodes, Some(vec!["gpu-a100-0".to_owned()]));
    assert_eq!(changes.notes, ["avoids node gpu-a100-0 (xid)"]);
    let known = ["gpu-a100-0".to_owned()];
    let again = plan_changes(
        &avoid,
        &xid,
        current(None, None, &known),
        &defaults,
        &classes,
    );
    assert_eq!(again.avoid_nodes, None);
    let many: Vec<String> = (0..16).map(|n| format!("node-{n}")).collect();
    let full = plan_changes(
        &avoid,
        &xid,
        current(None, None, &many),
        &defaults,
        &classes,
    );
    let nodes = full.avoid_nodes.unwrap();
    assert_eq!(nodes.len(), 16);
    assert_eq!(nodes.first().map(String::as_str), Some("node-1"));
    assert_eq!(nodes.last().map(String::as_str), Some("gpu-a100-0"));
    let unknown = AttemptFailure { node: None, ..xid };
    let nowhere = plan_changes(
        &avoid,
        &unknown,
        current(None, None, &[]),
        &defaults,
        &classes,
    );
    assert_eq!(nowhere.avoid_nodes, None);
}

#[test]
fn factors_are_bounded() {
    assert!(Factor::new(1.5).is_some());
    assert!(Factor::new(4.0).is_some());
    for bad in [1.0, 0.5, -2.0, 4.01, f64::NAN, f64::INFINITY] {
        assert!(Factor::new(bad).is_none(), "{bad}");
    }
}

#[test]
fn class_names_round_trip() {
    for class in FailureClass::ALL {
        assert_eq!(class.as_str().parse::<FailureClass>(), Ok(class));
        let json = serde_json::to_string(&class).unwrap();
        assert_eq!(json, format!("\"{}\"", class.as_str()));
    }
}
