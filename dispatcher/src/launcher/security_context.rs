//! The security contexts of task pods' containers, per Pod Security level: the task's
//! container follows its GPU class's profile (`restricted` unless the placement file says
//! `baseline`); the runner's init container is always `restricted`. Pure; used only by
//! [`super::job_spec`].

use k8s_openapi::api::core::v1::{Capabilities, SeccompProfile, SecurityContext};

use crate::placement::PodSecurityLevel;

pub(super) fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

/// The task container's context: `restricted`, or for a `baseline` class the runtime's
/// default capabilities (a root process may chown, install packages) and no non-root
/// rule, still without privileges or privilege escalation.
pub(super) fn task_container_context(profile: PodSecurityLevel) -> SecurityContext {
    match profile {
        PodSecurityLevel::Restricted => restricted_container_context(),
        PodSecurityLevel::Baseline => SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        },
    }
}

/// The `restricted` profile's container context (the runner's init container always).
pub(super) fn restricted_container_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..SecurityContext::default()
    }
}
