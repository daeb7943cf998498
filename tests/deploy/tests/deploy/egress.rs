//! Task pods' egress (`tasks.egress.*` in the chart, `components/tasks-egress` in the
//! Kustomize tree): `none` adds nothing, `internet` reaches public addresses but not the
//! private ranges, loopback or the cluster's pod and Service CIDRs, `allowList` only its
//! entries; the cloud metadata address is unreachable in every mode. Each rendering's
//! policies pass a server-side dry-run on the test API server.

use std::net::IpAddr;

use serde_json::Value;

use crate::support::*;

const METADATA: &str = "169.254.169.254";

/// Whether `address` is inside `cidr` (both of the same family).
fn contains(cidr: &str, address: IpAddr) -> bool {
    let (network, bits) = cidr.split_once('/').unwrap();
    let bits: u32 = bits.parse().unwrap();
    match (network.parse::<IpAddr>().unwrap(), address) {
        (IpAddr::V4(network), IpAddr::V4(address)) => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(network) & mask == u32::from(address) & mask
        }
        (IpAddr::V6(network), IpAddr::V6(address)) => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(network) & mask == u128::from(address) & mask
        }
        _ => false,
    }
}

/// Whether the egress policies of the tasks namespace let a task pod reach
/// `address`:`port` over TCP through an `ipBlock` (the DNS and api rules select pods).
fn reaches(policies: &[&Value], address: &str, port: i64) -> bool {
    let address: IpAddr = address.parse().unwrap();
    policies.iter().any(|policy| {
        policy["spec"]["egress"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                let port_ok = rule["ports"]
                    .as_array()
                    .is_none_or(|ports| ports.iter().any(|p| p["port"].as_i64() == Some(port)));
                port_ok
                    && rule["to"].as_array().into_iter().flatten().any(|peer| {
                        let block = &peer["ipBlock"];
                        block["cidr"].as_str().is_some_and(|cidr| {
                            contains(cidr, address)
                                && !block["except"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .any(|except| contains(except.as_str().unwrap(), address))
                        })
                    })
            })
    })
}

fn tasks_policies<'a>(objects: &'a [Value], tasks: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["namespace"] == tasks)
        .collect()
}

const INTERNET: &str = "tasks:
  egress:
    mode: internet
    podCIDRs: [100.64.0.0/10, fd12:3456::/48]
    serviceCIDRs: [10.96.0.0/12]
";

const ALLOW_LIST: &str = "tasks:
  egress:
    mode: allowList
    allowList:
      - {cidr: 203.0.113.0/24, ports: [443]}
      - {cidr: 169.254.0.0/16}
      - {cidr: 0.0.0.0/0, ports: [80]}
      - {cidr: 10.1.2.3/32, ports: [3128]}
      - {cidr: \"::/0\", ports: [443]}
";

#[test]
fn task_pods_egress_follows_the_mode_and_never_reaches_the_metadata_address() {
    testsupport::needs_env!(Cluster, Program("kubectl"), Program("helm"));
    ensure_crds();
    let names = Names::unique("deploy-egress");
    let none = helm_template(&names, None);
    let internet = helm_template_extra(&names, None, INTERNET);
    let allow_list = helm_template_extra(&names, None, ALLOW_LIST);
    let component = kustomize_edited("overlays/dev", &names, |copy| {
        let file = copy.join("overlays/dev/kustomization.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        let edited = text.replace(
            "  - ../../components/namespaces",
            "  - ../../components/tasks-egress\n  - ../../components/namespaces",
        );
        assert_ne!(edited, text);
        std::fs::write(&file, edited).unwrap();
    });
    let renderings = [
        ("none", &none),
        ("internet", &internet),
        ("allowList", &allow_list),
        ("components/tasks-egress", &component),
    ];
    let mut all = Vec::new();
    for (source, rendered) in renderings {
        let objects = parsed(rendered);
        let policies = tasks_policies(&objects, &names.tasks);
        assert!(!policies.is_empty(), "{source}");
        // Never the cloud metadata endpoint, on any port.
        for port in [80, 443, 8080] {
            assert!(
                !reaches(&policies, METADATA, port),
                "{source}: metadata on {port}"
            );
        }
        all.push((source, objects));
    }
    let policies = |index: usize| tasks_policies(&all[index].1, &names.tasks);

    // none: only DNS and the api, as before (no ipBlock at all).
    assert!(!reaches(&policies(0), "8.8.8.8", 443));
    assert!(!none.contains("tasks-egress"));
    // internet, from the chart and the component: public yes; the cluster no.
    for index in [1, 3] {
        let source = all[index].0;
        let policies = policies(index);
        for (address, port) in [("8.8.8.8", 443), ("203.0.113.9", 22), ("2001:db8::1", 443)] {
            assert!(reaches(&policies, address, port), "{source}: {address}");
        }
        for address in [
            "10.1.2.3",
            "172.16.5.5",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.10.10",
            "fd00:ec2::254",
            "fe80::1",
            "::1",
        ] {
            assert!(!reaches(&policies, address, 443), "{source}: {address}");
        }
    }
    // The chart's cluster CIDRs are excluded too.
    assert!(!reaches(&policies(1), "100.64.1.1", 443));
    assert!(!reaches(&policies(1), "fd12:3456::9", 443));
    // allowList: the entries, on their ports, and nothing else.
    let listed = policies(2);
    assert!(reaches(&listed, "203.0.113.5", 443));
    assert!(!reaches(&listed, "203.0.113.5", 22));
    assert!(reaches(&listed, "169.254.1.1", 22));
    assert!(reaches(&listed, "8.8.8.8", 80));
    assert!(!reaches(&listed, "8.8.8.8", 443));
    assert!(reaches(&listed, "10.1.2.3", 3128));
    assert!(reaches(&listed, "2001:db8::1", 443));
    assert!(!reaches(&listed, "fd00:ec2::254", 443));

    // Refused renderings: the metadata address itself, not a CIDR, an unknown mode.
    let chart = repo_root().join("helm/agent-bus");
    for (sets, said) in [
        (
            vec![
                "tasks.egress.mode=allowList",
                "tasks.egress.allowList[0].cidr=169.254.169.254/32",
            ],
            "is the cloud metadata address",
        ),
        (
            vec!["tasks.egress.mode=allowList"],
            "tasks.egress.allowList: list at least one",
        ),
        (vec!["tasks.egress.mode=everything"], "/tasks/egress/mode"),
        (
            vec![
                "tasks.egress.mode=allowList",
                "tasks.egress.allowList[0].cidr=example.com",
            ],
            "cidr",
        ),
    ] {
        let mut args = vec![
            "template",
            "x",
            chart.to_str().unwrap(),
            "--kube-version",
            "v1.34.4",
        ];
        for set in &sets {
            args.extend(["--set", set]);
        }
        let out = run_status(tool("helm"), &args, None);
        assert!(!out.success, "{sets:?} rendered");
        assert!(out.stderr.contains(said), "{sets:?}: {}", out.stderr);
    }

    // The API server accepts every rendering's policies.
    let outcome = std::panic::catch_unwind(|| {
        create_namespaces(&none, &names);
        for (source, objects) in &all {
            for policy in tasks_policies(objects, &names.tasks) {
                let out = run_status(
                    tool("kubectl"),
                    &["apply", "--dry-run=server", "-o", "json", "-f", "-"],
                    Some(&policy.to_string()),
                );
                assert!(out.success, "{source}: {}\n{policy}", out.stderr);
                assert!(!out.stderr.contains("Warning"), "{source}: {}", out.stderr);
            }
        }
    });
    delete_namespaces(&names);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
