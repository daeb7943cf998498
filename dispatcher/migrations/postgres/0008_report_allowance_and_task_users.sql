-- What each task attempt's runner has reported so far (its allowance), and the user ids
-- the local executor runs each tenant's tasks as.
-- Keep in step with ../sqlite/0008_report_allowance_and_task_users.sql.

-- Per task attempt: the progress and usage reports stored and their bytes, and the
-- started and finished reports stored. Written in the transaction that stores the
-- reports, with a guard that refuses a batch past the allowance (429): one row read
-- per batch instead of a count over task_reports.
CREATE TABLE attempt_report_totals (
    task_id           TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt           INTEGER NOT NULL,
    reports           BIGINT NOT NULL CHECK (reports >= 0),
    bytes             BIGINT NOT NULL CHECK (bytes >= 0),
    lifecycle_reports BIGINT NOT NULL CHECK (lifecycle_reports >= 0),
    PRIMARY KEY (task_id, attempt)
);

-- The local executor (as root) runs a tenant's tasks as user and group
-- --local-task-uid-base + slot. A slot is never given to another tenant, so no
-- reference to tenants: a tenant's row outlives it and its files stay its own.
CREATE TABLE local_task_users (
    tenant TEXT PRIMARY KEY NOT NULL,
    slot   BIGINT NOT NULL UNIQUE CHECK (slot >= 0)
);
