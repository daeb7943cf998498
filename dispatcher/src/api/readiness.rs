//! `/readyz` answers from a cached dependency check, so probes, load balancers and anyone
//! else who asks cannot turn it into load on the database, Redis or the Kubernetes API
//! server.
//!
//! Invariants:
//! - at most one check runs at a time per process, and a new one starts only when the
//!   last finished at least [`Readiness::max_age`] ago: callers in between get the last
//!   answer, callers during a check wait for it and share it;
//! - a check never takes longer than [`CHECK_TIMEOUT`]: a dependency that does not answer
//!   by then counts as failing (a probe times out after a few seconds anyway).

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// How long a check's answer is reused.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(1);

/// The longest one dependency check may take before it counts as failing.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The last readiness check of this process. Shared by every listener that serves
/// `/readyz` (the api's and the metrics listener).
#[derive(Debug)]
pub struct Readiness {
    last: Mutex<Option<Checked>>,
    max_age: Duration,
    /// [`CHECK_TIMEOUT`], shorter in tests.
    timeout: Duration,
}

#[derive(Debug, Clone)]
struct Checked {
    finished: Instant,
    failing: Vec<String>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_AGE)
    }
}

impl Readiness {
    /// Reuses an answer for `max_age`.
    #[must_use]
    pub fn new(max_age: Duration) -> Self {
        Self {
            last: Mutex::new(None),
            max_age,
            timeout: CHECK_TIMEOUT,
        }
    }

    /// What is failing (empty: ready): the last answer while it is younger than
    /// `max_age`, else the answer of `check`, which runs at most once however many callers
    /// wait. `check` returns one line per failing dependency.
    pub async fn failing<F, Fut>(&self, check: F) -> Vec<String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Vec<String>>,
    {
        // Held across the check: concurrent callers queue here and then find the answer
        // fresh instead of checking again.
        let mut last = self.last.lock().await;
        if let Some(checked) = last.as_ref()
            && checked.finished.elapsed() < self.max_age
        {
            return checked.failing.clone();
        }
        let failing = match tokio::time::timeout(self.timeout, check()).await {
            Ok(failing) => failing,
            Err(_) => vec![format!(
                "dependency check: no answer within {:?}",
                self.timeout
            )],
        };
        *last = Some(Checked {
            finished: Instant::now(),
            failing: failing.clone(),
        });
        failing
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::Readiness;

    /// A check that counts its runs and takes `takes`, failing with `failing`.
    fn counted(
        runs: &Arc<AtomicUsize>,
        takes: Duration,
        failing: &[&str],
    ) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Vec<String>> + Send>> + use<> {
        let runs = runs.clone();
        let failing: Vec<String> = failing.iter().map(|s| (*s).to_owned()).collect();
        move || {
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(takes).await;
                failing
            })
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_check() {
        let readiness = Arc::new(Readiness::new(Duration::from_mins(1)));
        let runs = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let readiness = readiness.clone();
                let check = counted(&runs, Duration::from_millis(50), &["queue: refused"]);
                tokio::spawn(async move { readiness.failing(check).await })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), vec!["queue: refused".to_owned()]);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_answer_is_reused_until_it_is_older_than_max_age() {
        let readiness = Readiness::new(Duration::from_millis(200));
        let runs = Arc::new(AtomicUsize::new(0));
        assert!(
            readiness
                .failing(counted(&runs, Duration::ZERO, &[]))
                .await
                .is_empty()
        );
        // Within max_age: the old answer, even though the dependency now fails.
        assert!(
            readiness
                .failing(counted(&runs, Duration::ZERO, &["store: down"]))
                .await
                .is_empty()
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            readiness
                .failing(counted(&runs, Duration::ZERO, &["store: down"]))
                .await,
            vec!["store: down".to_owned()]
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_check_that_hangs_counts_as_failing() {
        let readiness = Readiness {
            timeout: Duration::from_millis(20),
            ..Readiness::new(Duration::ZERO)
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let failing = readiness
            .failing(counted(&runs, Duration::from_hours(1), &[]))
            .await;
        assert_eq!(
            failing,
            vec!["dependency check: no answer within 20ms".to_owned()]
        );
    }
}
