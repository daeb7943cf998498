-- A tenant an operator disabled (`dispatcher tenant disable`): its key is refused (403)
-- and its queued tasks are not launched until it is enabled again.
-- Keep in step with ../postgres/0007_tenant_disabled.sql.

-- Unix ms of the disabling; NULL: the tenant is enabled.
ALTER TABLE tenants ADD COLUMN disabled_at BIGINT;
