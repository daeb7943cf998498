//! What the dispatcher knows of Kubernetes that is neither the Job it builds
//! ([`crate::launcher::job_spec`]) nor a client: the rules its names follow.

pub mod names;
