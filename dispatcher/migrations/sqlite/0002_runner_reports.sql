-- What the runner inside each pod reports, and where a task runs now.
-- Keep in step with ../postgres/0002_runner_reports.sql.

-- The GPU class of the current attempt (a fallback may differ from the requested class).
ALTER TABLE tasks ADD COLUMN gpu_class TEXT;
-- The last sign of life from the runner (unix ms), and its latest heartbeat as JSON.
ALTER TABLE tasks ADD COLUMN last_heartbeat_at BIGINT;
ALTER TABLE tasks ADD COLUMN last_heartbeat TEXT;

-- Heartbeat-lost detection: running tasks by their last sign of life.
CREATE INDEX tasks_state_heartbeat ON tasks (state, last_heartbeat_at);

-- Every report but heartbeats, once per (task, attempt, sequence): a runner that resends
-- a batch after a lost response changes nothing. Sequence 0 holds the termination
-- summary read from the pod status.
CREATE TABLE task_reports (
    task_id     TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    sequence    BIGINT NOT NULL CHECK (sequence >= 0),
    kind        TEXT NOT NULL,
    body        TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (task_id, attempt, sequence)
);

-- Values the dispatcher generates once and all replicas share (the report-token key).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
