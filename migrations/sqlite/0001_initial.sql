-- Tasks: the current state of each tracked task. `data` holds the whole task as JSON;
-- the columns beside it are what the indexes and filters need.
CREATE TABLE tasks (
    provider         TEXT    NOT NULL,
    task_id          TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    source           TEXT    NOT NULL,
    external_task_id TEXT,
    created_at       REAL    NOT NULL,  -- Unix seconds
    updated_at       REAL    NOT NULL,
    next_poll_at     REAL,              -- NULL once terminal
    version          INTEGER NOT NULL,
    data             TEXT    NOT NULL,
    PRIMARY KEY (provider, task_id)
) WITHOUT ROWID;

-- Due polls, non-terminal tasks only (terminal tasks have no next_poll_at).
CREATE INDEX tasks_due ON tasks (next_poll_at) WHERE next_poll_at IS NOT NULL;
-- Newest-first listing, optionally by status or provider.
CREATE INDEX tasks_created ON tasks (created_at, provider, task_id);
CREATE INDEX tasks_status_created ON tasks (status, created_at);
CREATE INDEX tasks_external ON tasks (provider, external_task_id)
    WHERE external_task_id IS NOT NULL;

-- The append-only event log. `seq` is global and strictly increasing; `body` is the event
-- JSON exactly as served, so reads splice it instead of re-encoding.
CREATE TABLE events (
    seq      INTEGER PRIMARY KEY,
    provider TEXT NOT NULL,
    task_id  TEXT NOT NULL,
    type     TEXT NOT NULL,
    at       REAL NOT NULL,
    body     TEXT NOT NULL
);
CREATE INDEX events_task ON events (provider, task_id, seq);
CREATE INDEX events_provider ON events (provider, seq);

-- Every webhook request that passed authentication, as received.
CREATE TABLE deliveries (
    id          INTEGER PRIMARY KEY,
    provider    TEXT NOT NULL,
    received_at REAL NOT NULL,
    headers     TEXT NOT NULL,  -- JSON object of the headers we keep
    body        BLOB NOT NULL,
    sha256      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    error       TEXT,
    task_id     TEXT
);
CREATE INDEX deliveries_sha ON deliveries (provider, sha256);
CREATE INDEX deliveries_task ON deliveries (provider, task_id);
CREATE INDEX deliveries_rejected ON deliveries (id) WHERE outcome = 'rejected';
