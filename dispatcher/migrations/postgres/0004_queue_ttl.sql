-- Queue TTL: when a queued task expires if no launcher took it, and a tenant's default.
-- Keep in step with ../sqlite/0004_queue_ttl.sql.

-- Unix ms; NULL: the task waits as long as it takes.
ALTER TABLE tasks ADD COLUMN expires_at BIGINT;
-- The expiry sweep: queued tasks by deadline.
CREATE INDEX tasks_expiry ON tasks (state, expires_at);
-- Seconds; NULL: tasks of the tenant wait as long as they take unless they ask otherwise.
ALTER TABLE tenants ADD COLUMN default_queue_ttl_seconds BIGINT;
