-- Tenant quotas on running work and fair choice across tenants.
-- Keep in step with ../postgres/0006_tenant_quotas.sql.

-- How many of a tenant's tasks may be launching, launched or running at once; NULL: no
-- limit.
ALTER TABLE tenants ADD COLUMN max_running BIGINT CHECK (max_running >= 0);
-- When a launcher last claimed one of the tenant's tasks (unix ms; NULL: never): the
-- round-robin across tenants serves the one claimed longest ago first. The claim writes
-- it in its transaction, which also locks the row for the quota check.
ALTER TABLE tenants ADD COLUMN last_claimed_at BIGINT;

-- GPUs a tenant's launching, launched and running tasks may hold at once, per GPU class.
CREATE TABLE tenant_gpu_quotas (
    tenant    TEXT NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
    gpu_class TEXT NOT NULL,
    max_gpus  BIGINT NOT NULL CHECK (max_gpus >= 0),
    PRIMARY KEY (tenant, gpu_class)
);

-- The fair choice and queue positions: a tenant's queued tasks of one queue in dispatch
-- order (the head of each tenant, and counts bounded by a LIMIT).
CREATE INDEX tasks_fair ON tasks (tenant, state, queue, priority DESC, id);
-- Tasks held by their tenant's quota (the re-offer pass and the waiting-on-quota gauge).
CREATE INDEX tasks_held ON tasks (state, reason, tenant, priority DESC, id);
-- The recent launch rate of a queue (estimated_start).
CREATE INDEX tasks_queue_launched ON tasks (queue, launched_at);
