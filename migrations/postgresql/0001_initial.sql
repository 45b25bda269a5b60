-- Tasks: the current state of each tracked task. `data` holds the whole task as JSON text
-- (not jsonb: it is spliced into answers verbatim, and jsonb refuses \u0000, which provider
-- error text and user metadata can hold); the columns beside it are what the indexes and
-- filters need, and `next_poll_at` is the truth (a lease moves only the column).
CREATE TABLE tasks (
    provider         TEXT        NOT NULL,
    task_id          TEXT        NOT NULL,
    status           TEXT        NOT NULL,
    source           TEXT        NOT NULL,
    external_task_id TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL,
    next_poll_at     TIMESTAMPTZ,           -- NULL once terminal
    version          INTEGER     NOT NULL,
    data             TEXT        NOT NULL,
    PRIMARY KEY (provider, task_id)
);

-- Due polls, non-terminal tasks only (terminal tasks have no next_poll_at).
CREATE INDEX tasks_due ON tasks (next_poll_at) WHERE next_poll_at IS NOT NULL;
-- Newest-first listing, optionally by status or provider.
CREATE INDEX tasks_created ON tasks (created_at, provider, task_id);
CREATE INDEX tasks_status_created ON tasks (status, created_at);
CREATE INDEX tasks_external ON tasks (provider, external_task_id)
    WHERE external_task_id IS NOT NULL;

-- The append-only event log. `seq` is global, strictly increasing and contiguous: writers
-- take their seqs from `log_head` as the last statement before COMMIT, and its row lock,
-- held to COMMIT, makes them commit in seq order (a sequence would hand numbers out at
-- insert and let them commit in another order, so a reader could skip one). `body` is the
-- event JSON as served, without its seq.
CREATE TABLE events (
    seq      BIGINT      PRIMARY KEY,
    provider TEXT        NOT NULL,
    task_id  TEXT        NOT NULL,
    type     TEXT        NOT NULL,
    at       TIMESTAMPTZ NOT NULL,
    body     TEXT        NOT NULL
);
CREATE INDEX events_task ON events (provider, task_id, seq);
CREATE INDEX events_provider ON events (provider, seq);

CREATE TABLE log_head (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq BIGINT  NOT NULL
);
INSERT INTO log_head (id, last_seq) VALUES (1, 0);

-- Every webhook request that passed authentication, as received.
CREATE TABLE deliveries (
    id          BIGSERIAL   PRIMARY KEY,
    provider    TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    headers     TEXT        NOT NULL,  -- JSON object of the headers we keep
    body        BYTEA       NOT NULL,
    sha256      TEXT        NOT NULL,
    outcome     TEXT        NOT NULL,
    error       TEXT,
    task_id     TEXT
);
CREATE INDEX deliveries_sha ON deliveries (provider, sha256);
CREATE INDEX deliveries_task ON deliveries (provider, task_id);
CREATE INDEX deliveries_rejected ON deliveries (id) WHERE outcome = 'rejected';
