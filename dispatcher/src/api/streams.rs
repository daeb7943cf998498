//! Followed streams (`events?follow=true`, `logs?follow=true`): how many one tenant may
//! hold open in this process, and how long one may last. Their state events come from
//! one shared poller ([`super::event_feed`]), but a followed stream still reads its
//! output lines and progress reports itself while it is open, so without a bound a few
//! hundred of them starve the pool every other request needs.
//!
//! Invariants:
//! - a tenant holds at most `max_per_tenant` followed streams per process; one more is
//!   refused with 429 `too_many_streams` before anything is read;
//! - a slot is held by the stream's body and freed when the body is dropped (the stream
//!   ended, the client went away, or the server shut it), never leaked;
//! - a followed stream ends after `max_duration` even if its task has not: the client
//!   reconnects (the CLI does), and a stream never outlives a deployment's drain by hours.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::error::ApiError;

/// The default of `--max-streams-per-tenant`.
pub const DEFAULT_MAX_PER_TENANT: usize = 32;
/// The default of `--max-stream-duration`.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_hours(1);

/// The followed streams open in this process, by tenant.
#[derive(Debug)]
pub struct OpenStreams {
    max_per_tenant: usize,
    max_duration: Duration,
    open: Mutex<HashMap<String, usize>>,
}

impl OpenStreams {
    #[must_use]
    pub fn new(max_per_tenant: usize, max_duration: Duration) -> Self {
        Self {
            max_per_tenant,
            max_duration,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more followed stream of `tenant`, or 429 `too_many_streams`.
    pub fn open(self: &Arc<Self>, tenant: &str) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(tenant.to_owned()).or_default();
        if *count >= self.max_per_tenant {
            return Err(ApiError::TooManyStreams {
                limit: self.max_per_tenant,
            });
        }
        *count += 1;
        Ok(StreamSlot {
            streams: Arc::clone(self),
            tenant: tenant.to_owned(),
            until: tokio::time::Instant::now() + self.max_duration,
        })
    }

    /// The followed streams `tenant` holds open now.
    #[must_use]
    pub fn open_for(&self, tenant: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(tenant).copied().unwrap_or(0)
    }
}

impl Default for OpenStreams {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PER_TENANT, DEFAULT_MAX_DURATION)
    }
}

/// One followed stream's place, and when the stream ends at the latest; dropping it
/// frees the place.
#[derive(Debug)]
pub struct StreamSlot {
    streams: Arc<OpenStreams>,
    tenant: String,
    until: tokio::time::Instant,
}

impl StreamSlot {
    /// Whether the stream has lasted `--max-stream-duration`: it ends, and the client
    /// reconnects for the rest.
    #[must_use]
    pub fn expired(&self) -> bool {
        tokio::time::Instant::now() >= self.until
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .streams
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            // Tenants with nothing open leave the map: it is bounded by the open streams.
            if *count == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::OpenStreams;
    use crate::api::error::ApiError;

    #[test]
    fn a_tenant_holds_at_most_its_slots_and_a_dropped_stream_frees_one() {
        let streams = Arc::new(OpenStreams::new(2, Duration::from_mins(1)));
        let first = streams.open("acme").unwrap();
        let _second = streams.open("acme").unwrap();
        assert!(matches!(
            streams.open("acme"),
            Err(ApiError::TooManyStreams { limit: 2 })
        ));
        // Another tenant has slots of its own.
        let _other = streams.open("globex").unwrap();
        drop(first);
        assert_eq!(streams.open_for("acme"), 1);
        let _third = streams.open("acme").unwrap();
        assert_eq!(streams.open_for("acme"), 2);
    }

    #[test]
    fn tenants_without_streams_leave_no_trace() {
        let streams = Arc::new(OpenStreams::default());
        drop(streams.open("acme").unwrap());
        assert_eq!(streams.open_for("acme"), 0);
        assert!(streams.open.lock().unwrap().is_empty());
    }
}
