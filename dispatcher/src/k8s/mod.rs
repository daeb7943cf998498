//! What the dispatcher knows of Kubernetes that is neither the Job it builds
//! ([`crate::launcher::job_spec`]) nor a client: the rules its names follow, the
//! quantity notation of CPU and memory, and the rate its clients may ask at. Imports nothing else of the crate, so the task
//! domain and the placement file can both use it without a module cycle
//! (`crate::task::quantity` re-exports [`quantity`]).

pub mod names;
pub mod quantity;
pub mod rate_limit;
pub mod retry_after;
