-- The dispatcher's durable state: tenants, tasks, their labels and their history.
-- Times are unix milliseconds (INTEGER is 64-bit in SQLite); ids are hyphenated UUIDv7
-- text, whose BINARY order is id order (newest-first listing, cursors).
-- Keep in step with ../postgres/0001_init.sql: the store's SQL runs unchanged on both.

CREATE TABLE tenants (
    name             TEXT PRIMARY KEY NOT NULL,
    api_key_hash     TEXT NOT NULL UNIQUE,
    max_queued_tasks BIGINT NOT NULL CHECK (max_queued_tasks >= 0),
    created_at       BIGINT NOT NULL
);

CREATE TABLE tasks (
    id              TEXT PRIMARY KEY NOT NULL,
    tenant          TEXT NOT NULL REFERENCES tenants (name),
    name            TEXT NOT NULL,
    queue           TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    -- The validated TaskSpec as JSON; name, queue and priority are copies for indexing.
    spec            TEXT NOT NULL,
    state           TEXT NOT NULL,
    reason          TEXT,
    message         TEXT,
    attempt         INTEGER NOT NULL CHECK (attempt >= 1),
    exit_code       INTEGER,
    idempotency_key TEXT,
    request_hash    TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    UNIQUE (tenant, idempotency_key)
);

-- A tenant's tasks, newest first (GET /v1/tasks with its cursor).
CREATE INDEX tasks_tenant_id ON tasks (tenant, id);
-- The quota check: a tenant's queued tasks.
CREATE INDEX tasks_tenant_state ON tasks (tenant, state);
-- Dispatch order within a queue: priority first, then age.
CREATE INDEX tasks_claim ON tasks (state, queue, priority DESC, id);
-- Reconcilers: tasks that have sat in one state too long.
CREATE INDEX tasks_state_updated ON tasks (state, updated_at);

CREATE TABLE task_labels (
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (task_id, key)
) WITHOUT ROWID;

CREATE INDEX task_labels_key_value ON task_labels (key, value, task_id);

CREATE TABLE task_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    reason     TEXT,
    message    TEXT,
    exit_code  INTEGER,
    at         BIGINT NOT NULL
);

CREATE INDEX task_events_task ON task_events (task_id, id);
