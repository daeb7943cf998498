//! The client-side rate limit of Kubernetes API requests, as client-go's token bucket:
//! on average at most `qps` requests a second per process, in bursts of at most `burst`.
//! A process that creates Jobs as fast as its queue allows would otherwise hand the API
//! server's Priority and Fairness the job of saying no, with 429s that cost a round trip
//! each; kube-controller-manager and the scheduler limit themselves the same way.
//!
//! Invariants: every request waits for a token before it is sent (in `poll_ready`, so
//! the kube client's buffer holds the requests that wait, in order); the limiter is one
//! per client, shared by its clones.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tower::{Layer, Service};

/// The defaults of `--kube-api-qps` and `--kube-api-burst`: those of kube-controller-manager
/// in busy clusters (its own Job controller sends as much). At 50 a second, the launcher's
/// creates were its ceiling: `make bench` saturated at 54 Jobs/s while the same API server
/// took 100 to 250 direct creates a second. The API server's own priority and fairness
/// (429 with Retry-After, honoured) protects it beyond that.
pub const DEFAULT_QPS: u32 = 200;
pub const DEFAULT_BURST: u32 = 400;

/// The layer to give `kube::client::ClientBuilder::with_layer`.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<DefaultDirectRateLimiter>,
}

impl RateLimitLayer {
    /// `qps` requests a second on average, `burst` at once; both at least 1.
    #[must_use]
    pub fn new(qps: NonZeroU32, burst: NonZeroU32) -> Self {
        Self::with_quota(Quota::per_second(qps).allow_burst(burst))
    }

    fn with_quota(quota: Quota) -> Self {
        Self {
            limiter: Arc::new(RateLimiter::direct(quota)),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner,
            limiter: Arc::clone(&self.limiter),
            waiting: None,
            admitted: false,
        }
    }
}

/// A service whose requests each wait for a token first.
pub struct RateLimited<S> {
    inner: S,
    limiter: Arc<DefaultDirectRateLimiter>,
    /// The wait for the next token, while there is one.
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// A token was taken for the next `call`.
    admitted: bool,
}

impl<S: std::fmt::Debug> std::fmt::Debug for RateLimited<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimited")
            .field("inner", &self.inner)
            .field("admitted", &self.admitted)
            .finish_non_exhaustive()
    }
}

impl<S, Request> Service<Request> for RateLimited<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.admitted {
            let limiter = Arc::clone(&self.limiter);
            let waiting = self
                .waiting
                .get_or_insert_with(|| Box::pin(async move { limiter.until_ready().await }));
            if waiting.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.waiting = None;
            self.admitted = true;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // Each call spends the token its poll_ready waited for.
        self.admitted = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::{Duration, Instant};

    use governor::Quota;
    use tower::{Layer as _, Service as _, ServiceExt as _, service_fn};

    use super::RateLimitLayer;

    fn count(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    // Only lower bounds on time and waits that cannot end are asserted: a loaded machine
    // is slow, never fast.

    #[tokio::test]
    async fn requests_pass_no_faster_than_the_rate() {
        let quota = Quota::with_period(Duration::from_millis(10))
            .unwrap()
            .allow_burst(count(1));
        let layer = RateLimitLayer::with_quota(quota);
        let mut service = layer.layer(service_fn(|n: u32| async move { Ok::<_, ()>(n) }));
        let started = Instant::now();
        for n in 0..21 {
            assert_eq!(service.ready().await.unwrap().call(n).await, Ok(n));
        }
        // One at once, then one every 10 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_burst_passes_and_clones_share_one_bucket() {
        // Two at once, then one an hour: the third waits whichever service asks.
        let layer = RateLimitLayer::with_quota(Quota::per_hour(count(1)).allow_burst(count(2)));
        let mut first = layer.layer(service_fn(|()| async { Ok::<_, ()>(()) }));
        let mut second = layer.layer(service_fn(|()| async { Ok::<_, ()>(()) }));
        first.ready().await.unwrap().call(()).await.unwrap();
        second.ready().await.unwrap().call(()).await.unwrap();
        let third = tokio::time::timeout(Duration::from_millis(200), first.ready()).await;
        assert!(
            third.is_err(),
            "a third request passed within the burst of two"
        );
    }
}
