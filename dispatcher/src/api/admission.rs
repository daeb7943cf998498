//! Load shedding: at most `max_in_flight` API requests are handled at once per process;
//! one more is answered at once with 503 `overloaded` and `Retry-After`, instead of
//! waiting for a database connection until it times out while memory grows with the
//! queue of waiting requests.
//!
//! Invariants:
//! - a request holds its slot while its handler runs, not while a response body streams
//!   (an event stream's slot is free as soon as its headers are sent; streams have their
//!   own cap);
//! - the probes and `/metrics` are never shed (they are outside this layer), so an
//!   overloaded dispatcher still says it is alive and ready;
//! - a shed request did nothing: it never reached a handler.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use tokio::sync::Semaphore;

use super::AppState;
use super::error::ApiError;

/// The default of `--max-in-flight-requests`: far more than the database pool serves at
/// once (so bursts queue briefly on the pool), few enough that the waiting requests of a
/// flood stay within a few megabytes and a few hundred milliseconds.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// How many API requests may be handled at once.
#[derive(Debug, Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    max_in_flight: usize,
}

impl Admission {
    /// Admits up to `max_in_flight` requests at once (at least one).
    #[must_use]
    pub fn new(max_in_flight: usize) -> Self {
        let max_in_flight = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            slots: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
        }
    }

    /// Takes a slot as a request does, until the returned guard is dropped; `None` when
    /// none is free. What a request in flight holds (tests fill the slots with it).
    #[must_use]
    pub fn try_take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_IN_FLIGHT)
    }
}

/// The middleware: runs the request in a free slot, or answers 503 `overloaded` at once.
pub async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(_slot) = state.admission.try_take() else {
        state.metrics().http().shed();
        return ApiError::Overloaded {
            max_in_flight: state.admission.max_in_flight,
        }
        .into_response();
    };
    next.run(request).await
}
