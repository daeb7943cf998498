//! Durable state (being written; see the store section of the dispatcher-core issue).
