//! The queue (being written; see the queue section of the dispatcher-core issue).
