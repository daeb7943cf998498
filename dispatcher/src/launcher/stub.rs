//! The stub executor (`--executor stub`), for benchmarks only: every launch succeeds at
//! once and nothing runs (no Job, no process), so `make bench` can measure the store,
//! queue and launcher path on its own, without the Kubernetes API server's share. Its
//! tasks stay `launched` forever: nothing watches them, and a cancel has nothing to stop.

use crate::task::Task;

use super::LaunchOutcome;

/// Launches nothing and says it launched.
#[derive(Debug, Clone, Copy, Default)]
pub struct StubExecutor;

impl StubExecutor {
    /// `Launched` at once: the launcher records the state move as it would after a
    /// Job's create was answered.
    // Async like the other executors' launch, so the launcher's match stays uniform.
    #[allow(clippy::unused_async)]
    pub async fn launch(&self, _task: &Task) -> LaunchOutcome {
        LaunchOutcome::Launched
    }

    /// Nothing runs, so nothing is stopped.
    pub fn cancel(&self, _task: &Task) {}
}

#[cfg(test)]
mod tests {
    use super::StubExecutor;
    use crate::launcher::LaunchOutcome;
    use crate::task::fixtures::TaskFixture;

    #[tokio::test]
    async fn every_launch_succeeds_at_once() {
        let task = TaskFixture::new().obj();
        assert_eq!(StubExecutor.launch(&task).await, LaunchOutcome::Launched);
        StubExecutor.cancel(&task);
    }
}
