-- The output lines each task attempt's runner shipped, kept past the pod and the Job.
-- Keep in step with ../sqlite/0009_task_logs.sql.

-- One row per line, once per (task, attempt, sequence): a resent batch changes nothing,
-- and the sequence is the order the runner read the lines in. `at` is the runner's
-- time of the line (unix ms), `stream` 'stdout' or 'stderr'.
CREATE TABLE task_logs (
    task_id  TEXT COLLATE "C" NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt  INTEGER NOT NULL,
    sequence BIGINT NOT NULL CHECK (sequence >= 0),
    stream   TEXT NOT NULL,
    at       BIGINT NOT NULL,
    line     TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt, sequence)
);

-- Per task attempt: the bytes and lines of its log kept so far (its cap, separate from
-- the report allowance), and when the cap was reached.
CREATE TABLE attempt_log_totals (
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL,
    bytes   BIGINT NOT NULL CHECK (bytes >= 0),
    lines   BIGINT NOT NULL CHECK (lines >= 0),
    -- Unix ms of the first line refused for the cap (its marker written); NULL: under it.
    capped_at BIGINT,
    PRIMARY KEY (task_id, attempt)
);

-- The retention sweep finds ended tasks by finished_at (tasks_tenant_finished is by tenant).
CREATE INDEX tasks_finished_at ON tasks (finished_at);
