//! The flags of the watchers' leader election (the Lease, and client-go's three
//! durations). Checked against each other by [`LeaseArgs::timing`], at start.

use std::time::Duration;

use clap::Args;

use super::values::parse_duration;
use crate::watcher::lease::{Timing, TimingError};

#[derive(Debug, Clone, Args)]
pub struct LeaseArgs {
    /// Name of the Lease the watchers elect their leader through.
    #[arg(
        long,
        env = "AGENT_BUS_LEASE_NAME",
        default_value = "agent-bus-watcher"
    )]
    pub lease_name: String,
    /// Namespace of that Lease (default: the tasks namespace).
    #[arg(long, env = "AGENT_BUS_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a leader may go without renewing before another replica takes over,
    /// measured by each replica on its own clock from when it saw the last renewal (whole
    /// seconds).
    #[arg(long, env = "AGENT_BUS_LEASE_DURATION", value_parser = parse_duration, default_value = "15s")]
    pub lease_duration: Duration,
    /// The leader stops leading when it has not renewed for this long; less than
    /// --lease-duration, so it stops before anyone may take over.
    #[arg(long, env = "AGENT_BUS_LEASE_RENEW_DEADLINE", value_parser = parse_duration, default_value = "10s")]
    pub lease_renew_deadline: Duration,
    /// How often the leader renews and the other replicas try; less than
    /// --lease-renew-deadline.
    #[arg(long, env = "AGENT_BUS_LEASE_RETRY_PERIOD", value_parser = parse_duration, default_value = "2s")]
    pub lease_retry_period: Duration,
}

impl LeaseArgs {
    /// The three durations, checked: retry period < renew deadline < duration.
    pub fn timing(&self) -> Result<Timing, TimingError> {
        Timing::new(
            self.lease_duration,
            self.lease_renew_deadline,
            self.lease_retry_period,
        )
    }
}
