-- Webhooks: each tenant's default webhook and signing secret, and the outbox of
-- deliveries with their attempts (docs/WEBHOOKS.md).
-- Keep in step with ../sqlite/0010_webhooks.sql.

-- The default webhook of the tenant's tasks that name none (`events`: a JSON array of
-- event names), and the secret deliveries are signed with: `whsec_` and base64 of
-- random bytes. Kept as is, not hashed: signing needs it (docs/SECURITY.md).
ALTER TABLE tenants ADD COLUMN webhook_url TEXT;
ALTER TABLE tenants ADD COLUMN webhook_events TEXT;
ALTER TABLE tenants ADD COLUMN webhook_secret TEXT;

-- One row per notification, written in the transaction of the state change it tells
-- of; `body` is fixed then, so every attempt sends the same bytes under the same id.
-- A sender claims a row by setting `lease_token` and `lease_until` (compare-and-set on
-- an expired lease); one that dies mid-send leaves the lease to run out, and the row
-- is sent again, with the same id.
CREATE TABLE webhook_deliveries (
    id              TEXT COLLATE "C" PRIMARY KEY,
    task_id         TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    tenant          TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    -- pending, delivered, failed (given up or refused)
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    created_at      BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    lease_token     TEXT,
    lease_until     BIGINT,
    delivered_at    BIGINT,
    given_up_at     BIGINT,
    last_error      TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_task ON webhook_deliveries (task_id, created_at);

-- The attempts of a delivery: when, and the status code or the error. Only the last
-- few are kept (the count is on the delivery).
CREATE TABLE webhook_attempts (
    delivery_id TEXT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL CHECK (attempt >= 1),
    at          BIGINT NOT NULL,
    status_code INTEGER,
    error       TEXT,
    duration_ms BIGINT NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
