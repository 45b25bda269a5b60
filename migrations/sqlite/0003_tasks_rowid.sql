-- Tasks move to a rowid table. WITHOUT ROWID suits rows far smaller than a page; a task's
-- JSON is about half of one, so each insert split and rewrote wide leaf pages, and every
-- secondary index carried the whole (provider, task_id) key. Measured on the webhook
-- path (docs/benchmarks.md): 28 KiB of WAL per delivery instead of 40, and inserts at half
-- the CPU. The key becomes a unique index, which the upsert's ON CONFLICT target uses.
CREATE TABLE tasks_by_rowid (
    provider         TEXT    NOT NULL,
    task_id          TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    source           TEXT    NOT NULL,
    external_task_id TEXT,
    created_at       REAL    NOT NULL,  -- Unix seconds
    updated_at       REAL    NOT NULL,
    next_poll_at     REAL,              -- NULL once terminal
    version          INTEGER NOT NULL,
    data             TEXT    NOT NULL
);
INSERT INTO tasks_by_rowid (provider, task_id, status, source, external_task_id, created_at,
                            updated_at, next_poll_at, version, data)
SELECT provider, task_id, status, source, external_task_id, created_at,
       updated_at, next_poll_at, version, data
FROM tasks ORDER BY created_at;
DROP TABLE tasks;
ALTER TABLE tasks_by_rowid RENAME TO tasks;

CREATE UNIQUE INDEX tasks_key ON tasks (provider, task_id);
CREATE INDEX tasks_due ON tasks (next_poll_at) WHERE next_poll_at IS NOT NULL;
CREATE INDEX tasks_created ON tasks (created_at, provider, task_id);
CREATE INDEX tasks_status_created ON tasks (status, created_at);
CREATE INDEX tasks_external ON tasks (provider, external_task_id)
    WHERE external_task_id IS NOT NULL;
CREATE INDEX tasks_settled ON tasks (provider, status, source);

-- Nothing reads deliveries by task; the index only cost a random insert per delivery.
DROP INDEX deliveries_task;
