//! Leader election against the real API server with clocks that disagree: one elector's
//! wall clock (what it writes into `renewTime`) is skewed by an hour either way. The
//! election measures everything on each replica's own monotonic clock, so the skew must
//! neither let a follower steal a live lease nor keep it waiting on a dead one.
//! (The decisions themselves are table-tested in `watcher::lease::observed`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatcher::watcher::lease::{Clock, Elector, LeaseConfig, SystemClock, Timing};
use k8s_openapi::api::coordination::v1::Lease;
use testsupport::{TestNamespace, with_namespace};

/// Short durations, with room for a slow API server on a busy machine: the holder renews
/// every second and would have to miss five seconds of renewals to give up.
fn timing() -> Timing {
    Timing::new(
        Duration::from_secs(6),
        Duration::from_secs(5),
        Duration::from_secs(1),
    )
    .unwrap()
}

/// The system's clocks with the wall clock moved by `by`.
#[derive(Debug)]
struct Skewed {
    by: jiff::SignedDuration,
    system: SystemClock,
}

impl Clock for Skewed {
    fn wall(&self) -> jiff::Timestamp {
        self.system.wall().checked_add(self.by).unwrap()
    }

    fn monotonic(&self) -> Duration {
        self.system.monotonic()
    }
}

fn elector(ns: &TestNamespace, lease: &str, identity: &str, skew_hours: i64) -> Elector {
    let config = LeaseConfig {
        name: lease.to_owned(),
        namespace: ns.name.clone(),
        identity: identity.to_owned(),
        timing: timing(),
    };
    let clock = Skewed {
        by: jiff::SignedDuration::from_hours(skew_hours),
        system: SystemClock::default(),
    };
    Elector::with_clock(ns.client.clone(), config, Arc::new(clock))
}

/// The Lease's holder and how far its renewTime is from this machine's clock, in hours.
async fn holder_and_skew(ns: &TestNamespace, lease: &str) -> (Option<String>, i64) {
    let spec = ns.api::<Lease>().get(lease).await.unwrap().spec.unwrap();
    let renewed = spec.renew_time.unwrap().0;
    let hours = renewed.duration_since(jiff::Timestamp::now()).as_secs_f64() / 3600.0;
    (spec.holder_identity, hours.round() as i64)
}

#[tokio::test]
async fn skewed_clocks_do_not_let_a_follower_steal_a_live_lease() {
    testsupport::needs_env!(Cluster);
    with_namespace("lease-live", |ns| async move {
        // The holder an hour behind (its renewTime looks an hour old), then the follower
        // an hour ahead (every renewTime looks an hour old to it).
        for (lease, holder_skew, follower_skew) in [("behind", -1, 0), ("ahead", 0, 1)] {
            let holder = elector(&ns, lease, "holder", holder_skew);
            let leading = holder.acquire().await.unwrap();
            assert_eq!(
                holder_and_skew(&ns, lease).await,
                (Some("holder".to_owned()), holder_skew)
            );
            let follower = elector(&ns, lease, "follower", follower_skew);
            // Three lease durations of a live holder: the follower must not win.
            let window = timing().duration() * 3;
            let stolen = tokio::time::timeout(window, follower.acquire()).await;
            assert!(stolen.is_err(), "{lease}: the follower took a live lease");
            assert!(!*leading.borrow(), "{lease}: the holder lost its lease");
            assert_eq!(
                holder_and_skew(&ns, lease).await.0.as_deref(),
                Some("holder")
            );
            drop(leading);
        }
    })
    .await;
}

#[tokio::test]
async fn skewed_clocks_do_not_keep_a_dead_lease() {
    testsupport::needs_env!(Cluster);
    with_namespace("lease-dead", |ns| async move {
        // The holder an hour ahead (its last renewTime is an hour in the follower's
        // future), then the follower an hour behind (the same, seen from the other side).
        for (lease, holder_skew, follower_skew) in [("ahead", 1, 0), ("behind", 0, -1)] {
            let holder = elector(&ns, lease, "holder", holder_skew);
            let leading = holder.acquire().await.unwrap();
            assert_eq!(
                holder_and_skew(&ns, lease).await,
                (Some("holder".to_owned()), holder_skew)
            );
            // The holder stops renewing (as a replica that froze or lost its network).
            drop(leading);
            let started = Instant::now();
            let follower = elector(&ns, lease, "follower", follower_skew);
            let taken = tokio::time::timeout(testsupport::CLUSTER_TIMEOUT, follower.acquire())
                .await
                .unwrap_or_else(|_| panic!("{lease}: the follower never took the dead lease"))
                .unwrap();
            let waited = started.elapsed();
            // Not before the lease duration on its own clock: it first saw the record
            // after `started`, and nothing changed it since. (And not an hour later:
            // the timeout above.)
            assert!(
                waited > timing().duration(),
                "{lease}: took over after {waited:?}"
            );
            assert_eq!(
                holder_and_skew(&ns, lease).await,
                (Some("follower".to_owned()), follower_skew)
            );
            drop(taken);
        }
    })
    .await;
}
