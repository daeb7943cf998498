//! The metrics hear of every store operation (`agent_bus_store_*`): the store tells its
//! [`OperationObserver`] and counts nothing itself.

use std::time::Duration;

use super::Metrics;
use crate::store::OperationObserver;

impl OperationObserver for Metrics {
    fn operation(&self, name: &'static str, answered: bool, took: Duration) {
        self.store_query(name, answered, took);
    }
}
