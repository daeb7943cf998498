-- What each tenant's tasks that finished on a UTC day cost (compute and LLM), kept by
-- the store in the transaction that records the finish (store::transitions) and with
-- every LLM cost a runner reports after it (store::reports), so a budget check sums at
-- most 31 rows instead of the tenant's tasks of the month. `day` is the Unix day of
-- the finish: its time in milliseconds divided by 86400000.
-- Keep in step with ../sqlite/0012_tenant_daily_spend.sql.
CREATE TABLE tenant_daily_spend (
    tenant  TEXT NOT NULL,
    day     BIGINT NOT NULL,
    dollars DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, day)
);
INSERT INTO tenant_daily_spend (tenant, day, dollars)
SELECT tenant, finished_at / 86400000,
       SUM(COALESCE(gpu_cost_dollars, 0) + COALESCE(cpu_cost_dollars, 0)
           + COALESCE(memory_cost_dollars, 0) + llm_cost_dollars)
FROM tasks WHERE finished_at IS NOT NULL
GROUP BY tenant, finished_at / 86400000;
