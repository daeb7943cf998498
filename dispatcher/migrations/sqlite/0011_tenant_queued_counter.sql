-- How many of each tenant's tasks are queued, kept by the store in the transaction of
-- every change that enters or leaves the queued state (store::tasks, store::transitions),
-- so a submit checks the tenant's queued-task quota with one row read instead of
-- counting its queue: the cost of a submit does not grow with the queue.
-- Keep in step with ../postgres/0011_tenant_queued_counter.sql.
ALTER TABLE tenants ADD COLUMN queued_tasks BIGINT NOT NULL DEFAULT 0;
UPDATE tenants SET queued_tasks = (
    SELECT COUNT(*) FROM tasks WHERE tasks.tenant = tenants.name AND tasks.state = 'queued'
);
