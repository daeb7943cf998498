//! The launcher: claims queued tasks and gives each attempt exactly one Job.

pub mod job_spec;
