-- When each stage of a task began, what it cost, and tenant budgets.
-- Keep in step with ../sqlite/0003_cost_and_timeline.sql.

-- Stage starts (unix ms) of the current attempt; queued_at is the submission or the
-- requeue, finished_at the final state.
ALTER TABLE tasks ADD COLUMN queued_at BIGINT;
ALTER TABLE tasks ADD COLUMN launched_at BIGINT;
ALTER TABLE tasks ADD COLUMN started_at BIGINT;
ALTER TABLE tasks ADD COLUMN finished_at BIGINT;
UPDATE tasks SET queued_at = created_at;
-- Compute cost, fixed when the task finishes (prices of that moment x running time x
-- requested resources); LLM cost, summed from the runner's usage reports as they arrive.
ALTER TABLE tasks ADD COLUMN gpu_cost_dollars DOUBLE PRECISION;
ALTER TABLE tasks ADD COLUMN cpu_cost_dollars DOUBLE PRECISION;
ALTER TABLE tasks ADD COLUMN memory_cost_dollars DOUBLE PRECISION;
ALTER TABLE tasks ADD COLUMN llm_cost_dollars DOUBLE PRECISION NOT NULL DEFAULT 0;

-- Spend per tenant and period (GET /v1/usage, budgets).
CREATE INDEX tasks_tenant_finished ON tasks (tenant, finished_at);

-- Budgets in dollars per UTC day and month; NULL means none. budget_action says what a
-- spent budget does: 'alert' (metrics only) or 'refuse' (402 on submit).
ALTER TABLE tenants ADD COLUMN daily_budget_dollars DOUBLE PRECISION;
ALTER TABLE tenants ADD COLUMN monthly_budget_dollars DOUBLE PRECISION;
ALTER TABLE tenants ADD COLUMN budget_action TEXT NOT NULL DEFAULT 'alert'
    CHECK (budget_action IN ('alert', 'refuse'));
