-- Retries: each task's retry counts, backoff, changes and the cost of its earlier
-- attempts; one row per ended attempt.
-- Keep in step with ../postgres/0005_retries.sql.

-- Retries counted against max_retries, and free ones (a rule's ignore).
ALTER TABLE tasks ADD COLUMN retries_used INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN ignored_attempts INTEGER NOT NULL DEFAULT 0;
-- Unix ms; while a queued task waits out a retry's backoff, when it may be launched.
ALTER TABLE tasks ADD COLUMN next_attempt_at BIGINT;
-- JSON array of node names the next attempts keep off; NULL: none.
ALTER TABLE tasks ADD COLUMN avoid_nodes TEXT;
-- Dollars: the compute cost of the attempts before the current one.
ALTER TABLE tasks ADD COLUMN earlier_gpu_cost_dollars REAL NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN earlier_cpu_cost_dollars REAL NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN earlier_memory_cost_dollars REAL NOT NULL DEFAULT 0;
-- Launchers release retries whose backoff ended.
CREATE INDEX tasks_next_attempt ON tasks (state, next_attempt_at);

CREATE TABLE task_attempts (
    task_id             TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt             INTEGER NOT NULL CHECK (attempt >= 1),
    -- succeeded | failed | timed_out | cancelled | fell_back
    outcome             TEXT NOT NULL,
    reason              TEXT,
    failure_class       TEXT,
    exit_code           INTEGER,
    message             TEXT,
    node                TEXT,
    gpu_class           TEXT,
    launched_at         BIGINT,
    started_at          BIGINT,
    ended_at            BIGINT NOT NULL,
    gpu_cost_dollars    REAL NOT NULL,
    cpu_cost_dollars    REAL NOT NULL,
    memory_cost_dollars REAL NOT NULL,
    -- retry | ignore | fail: what the retry policy did with a failed attempt.
    action              TEXT,
    decision            TEXT,
    -- JSON array of lines: what the next attempt changed.
    changes             TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (task_id, attempt)
);
