//! Which label and annotation keys, and which environment variable names, a tenant may
//! set. Labels and annotations reach the task's pod, where the kubelet, the container
//! runtime, CNI plugins, admission webhooks (Istio, Vault, Kueue) and our own watcher act
//! on them; environment variables reach the container runtime's hooks, the dynamic loader
//! and the runner. So both are decided here, in one place, as pure functions.
//!
//! Invariants:
//! - labels and annotations are an allow-list: a key passes only under a prefix the
//!   operator allowed ([`KeyPrefix`]); keys without a DNS prefix and the domains of
//!   [`RESERVED_DOMAINS`] never pass, whatever the operator lists, except under
//!   [`TEST_PREFIX`] when the operator lists it (the test environment's kwok reads those);
//! - environment names are a deny-list ([`reserved_env_name`]), a function of the name
//!   alone, so the value's shape may change without touching it.

use std::fmt;
use std::str::FromStr;

use crate::k8s::names::is_dns_label;

/// Domains (with their subdomains) whose keys belong to Kubernetes, its SIGs' projects
/// (`*.x-k8s.io`: Kueue's `kueue.x-k8s.io/priority-class`, cluster-api) or agent-bus: a
/// tenant setting them could change how the cluster treats the pod, pick its own
/// priority, or impersonate another task. Operators cannot open them.
pub const RESERVED_DOMAINS: [&str; 4] = ["kubernetes.io", "k8s.io", "x-k8s.io", "agent-bus.io"];

/// The one prefix inside a reserved domain an operator may allow: the test environment's
/// kwok decides a fake pod's fate from `agent-bus.io/test-*` annotations. Nothing on a
/// real node reads them.
pub const TEST_PREFIX: &str = "agent-bus.io/test-";

/// A label or annotation key prefix an operator allows tenants to use: a DNS subdomain
/// and `/`, optionally followed by the start of the key's name (`example.com/` allows
/// every `example.com/<name>`; `example.com/team-` only names starting with `team-`).
/// A subdomain is a prefix of its own: `example.com/` does not allow `ml.example.com/x`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// Whether `key` is under this prefix.
    #[must_use]
    pub fn allows(&self, key: &str) -> bool {
        key.starts_with(&self.0)
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for KeyPrefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let Some((domain, name_start)) = text.split_once('/') else {
            return Err(format!(
                "'{text}' is not a key prefix: a DNS subdomain and '/' (example.com/), \
                 optionally with the start of the name (example.com/team-)"
            ));
        };
        if !is_dns_subdomain(domain) {
            return Err(format!(
                "'{text}': '{domain}' is not a DNS subdomain of at most 253 characters"
            ));
        }
        let name_ok = name_start.len() < 63
            && name_start
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(format!(
                "'{text}': after the '/' only the start of a key name may follow \
                 (letters, digits, '-', '_', '.')"
            ));
        }
        if let Some(reserved) = reserved_domain(domain)
            && !text.starts_with(TEST_PREFIX)
        {
            return Err(format!(
                "'{text}': keys of {reserved} and its subdomains are reserved and cannot be \
                 allowed (only {TEST_PREFIX}…, for the test environment)"
            ));
        }
        Ok(Self(text.to_owned()))
    }
}

/// Whether the tenant may set the label or annotation `key` (syntax checked by the
/// caller) given the operator's `allowed` prefixes; the refusal states the rule. `kind`
/// is `label` or `annotation`.
pub(super) fn check_key(kind: &str, key: &str, allowed: &[KeyPrefix]) -> Result<(), String> {
    let Some((domain, _)) = key.rsplit_once('/') else {
        return Err(format!(
            "{kind} keys without a DNS prefix are reserved (the container runtime and \
             controllers read them); {}",
            allowed_list(kind, allowed)
        ));
    };
    if let Some(reserved) = reserved_domain(domain)
        && !key.starts_with(TEST_PREFIX)
    {
        return Err(format!(
            "key prefix {domain}/ is reserved ({reserved} and its subdomains belong to \
             Kubernetes or agent-bus)"
        ));
    }
    if allowed.iter().any(|prefix| prefix.allows(key)) {
        Ok(())
    } else {
        Err(format!(
            "key is not under a prefix the operator allows; {}",
            allowed_list(kind, allowed)
        ))
    }
}

fn allowed_list(kind: &str, allowed: &[KeyPrefix]) -> String {
    if allowed.is_empty() {
        format!("this dispatcher allows no tenant {kind}s")
    } else {
        let list: Vec<&str> = allowed.iter().map(KeyPrefix::as_str).collect();
        format!("allowed {kind} prefixes: {}", list.join(", "))
    }
}

/// The reserved domain `domain` is, or is a subdomain of.
fn reserved_domain(domain: &str) -> Option<&'static str> {
    let domain = domain.to_ascii_lowercase();
    RESERVED_DOMAINS.iter().copied().find(|reserved| {
        domain == *reserved
            || domain
                .strip_suffix(reserved)
                .is_some_and(|sub| sub.ends_with('.'))
    })
}

/// A DNS subdomain: dot-separated RFC 1123 labels, at most 253 characters.
pub(super) fn is_dns_subdomain(text: &str) -> bool {
    !text.is_empty() && text.len() <= 253 && text.split('.').all(is_dns_label)
}

/// Environment variable names a tenant may not set, as an exact name or a prefix ending
/// in `*`, each with the reason its refusal gives. Chosen as what changes how the
/// container runtime, the dynamic loader or the runner behave, not the tenant's own
/// program:
/// - `AGENT_BUS_*`: set by the runner for the task (its identity, report endpoint, token);
/// - `NVIDIA_*`: the NVIDIA container runtime reads `NVIDIA_VISIBLE_DEVICES`,
///   `NVIDIA_DRIVER_CAPABILITIES`, `NVIDIA_REQUIRE_*`, `NVIDIA_MIG_*` from the container's
///   environment to decide which GPUs and driver parts to mount: `all` would give a pod
///   every GPU of its node, whatever it was scheduled for;
/// - `CUDA_VISIBLE_DEVICES`: which of the granted GPUs CUDA uses is the device plugin's
///   decision, and accounting (GPU metrics per task) relies on it;
/// - `LD_*` (`LD_PRELOAD`, `LD_LIBRARY_PATH`, `LD_AUDIT`, …), `GCONV_PATH`,
///   `GLIBC_TUNABLES`: the loader and glibc apply them to every process of the container,
///   the runner (which holds the report token) first; a tenant's own program can still
///   set them for itself (`sh -c 'LD_LIBRARY_PATH=… exec python …'`);
/// - `LOCALDOMAIN`, `RES_OPTIONS`, `HOSTALIASES`: glibc's resolver reads them, so they
///   could send the runner's reports (with their token) to another host.
///
/// Not reserved, on purpose: `MALLOC_*` and `NCCL_*` (tuning of the tenant's own
/// processes that ML code needs: `MALLOC_ARENA_MAX`, `NCCL_DEBUG`, `NCCL_IB_HCA`; they
/// load no code), `KUBERNETES_SERVICE_*` (task pods get no service-account token;
/// overriding them only misdirects the tenant's own clients), `PATH`, `HOME`, `PYTHON*`.
pub const RESERVED_ENV: [(&str, &str); 9] = [
    (
        "AGENT_BUS_*",
        "reserved for agent-bus (the runner sets them)",
    ),
    (
        "NVIDIA_*",
        "reserved: the NVIDIA container runtime reads them to choose the GPUs and driver parts a container gets",
    ),
    (
        "CUDA_VISIBLE_DEVICES",
        "reserved: which GPUs a task sees is the device plugin's decision",
    ),
    (
        "LD_*",
        "reserved: the dynamic loader applies them to every process of the container, the runner too (set them in the command for your own process)",
    ),
    (
        "GCONV_PATH",
        "reserved: it makes glibc load code into every process of the container",
    ),
    (
        "GLIBC_TUNABLES",
        "reserved: it changes glibc in every process of the container, the runner too",
    ),
    (
        "LOCALDOMAIN",
        "reserved: it changes how the runner resolves the report endpoint",
    ),
    (
        "RES_OPTIONS",
        "reserved: it changes how the runner resolves the report endpoint",
    ),
    (
        "HOSTALIASES",
        "reserved: it changes how the runner resolves the report endpoint",
    ),
];

/// Why the environment variable `name` is reserved, or `None` if a tenant may set it.
#[must_use]
pub fn reserved_env_name(name: &str) -> Option<&'static str> {
    RESERVED_ENV.iter().find_map(|(pattern, why)| {
        let hit = match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *pattern,
        };
        hit.then_some(*why)
    })
}

#[cfg(test)]
mod tests {
    use super::{KeyPrefix, check_key, reserved_env_name};

    fn prefixes(list: &[&str]) -> Vec<KeyPrefix> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn operators_can_allow_only_prefixes_outside_the_reserved_domains() {
        for good in [
            "example.com/",
            "team.example.com/",
            "example.com/team-",
            "agent-bus.io/test-",
            "agent-bus.io/test-exit-code",
            "k8s.v1.cni.cncf.io/",
        ] {
            assert_eq!(good.parse::<KeyPrefix>().unwrap().as_str(), good);
        }
        for (bad, says) in [
            ("example.com", "is not a key prefix"),
            ("", "is not a key prefix"),
            ("/", "not a DNS subdomain"),
            ("Example.com/", "not a DNS subdomain"),
            ("example.com/a b", "start of a key name"),
            ("kubernetes.io/", "reserved"),
            ("node.kubernetes.io/", "reserved"),
            ("k8s.io/", "reserved"),
            ("x-k8s.io/", "reserved"),
            ("kueue.x-k8s.io/", "reserved"),
            ("agent-bus.io/", "reserved"),
            ("agent-bus.io/task-", "reserved"),
            ("test.agent-bus.io/test-", "reserved"),
        ] {
            let error = bad.parse::<KeyPrefix>().unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn a_key_passes_only_under_an_allowed_prefix_and_never_in_a_reserved_domain() {
        let allowed = prefixes(&[
            "example.com/",
            "agent-bus.io/test-",
            "vault.example.org/team-",
        ]);
        for key in [
            "example.com/owner",
            "agent-bus.io/test-exit-code",
            "vault.example.org/team-a",
        ] {
            assert_eq!(check_key("annotation", key, &allowed), Ok(()), "{key}");
        }
        for (key, says) in [
            ("owner", "without a DNS prefix are reserved"),
            ("io.kubernetes.cri-o.Devices", "without a DNS prefix"),
            ("k8s.v1.cni.cncf.io/networks", "not under a prefix"),
            ("sidecar.istio.io/inject", "not under a prefix"),
            ("vault.hashicorp.com/agent-inject", "not under a prefix"),
            ("kueue.x-k8s.io/priority-class", "reserved"),
            ("cluster.x-k8s.io/x", "reserved"),
            ("kubernetes.io/x", "reserved"),
            (
                "container.apparmor.security.beta.kubernetes.io/main",
                "reserved",
            ),
            ("k8s.io/x", "reserved"),
            ("agent-bus.io/task-id", "reserved"),
            ("AGENT-BUS.IO/task-id", "reserved"),
            ("ml.example.com/owner", "not under a prefix"),
            ("example.com.evil.org/owner", "not under a prefix"),
            ("vault.example.org/other", "not under a prefix"),
        ] {
            let error = check_key("annotation", key, &allowed).unwrap_err();
            assert!(error.contains(says), "{key}: {error}");
        }
        // Nothing allowed: everything refused, and the message says so.
        let error = check_key("label", "example.com/team", &[]).unwrap_err();
        assert!(error.contains("allows no tenant labels"), "{error}");
        // The test prefix passes only when the operator lists it.
        assert!(check_key("annotation", "agent-bus.io/test-exit-code", &[]).is_err());
    }

    #[test]
    fn runtime_loader_and_gpu_variables_are_reserved() {
        for name in [
            "AGENT_BUS_REPORT_TOKEN",
            "NVIDIA_VISIBLE_DEVICES",
            "NVIDIA_DRIVER_CAPABILITIES",
            "NVIDIA_REQUIRE_CUDA",
            "CUDA_VISIBLE_DEVICES",
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "GCONV_PATH",
            "GLIBC_TUNABLES",
            "LOCALDOMAIN",
            "RES_OPTIONS",
            "HOSTALIASES",
        ] {
            assert!(reserved_env_name(name).is_some(), "{name}");
        }
        for name in [
            "PATH",
            "HOME",
            "EPOCHS",
            "MALLOC_ARENA_MAX",
            "NCCL_DEBUG",
            "CUDA_HOME",
            "PYTHONPATH",
            "OLD_PRELOAD",
            "NVIDIA",
            "KUBERNETES_SERVICE_HOST",
        ] {
            assert_eq!(reserved_env_name(name), None, "{name}");
        }
    }
}
