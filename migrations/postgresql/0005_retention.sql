-- Retention (SPEC §5) and the full-disk check (SPEC §4).
--
-- SQLite's 0005 keeps the largest pruned seq and delivery id so that numbering never falls
-- back; here `log_head` and the deliveries' sequence already never do. What PostgreSQL
-- needs is the probe that tells a store which failed to commit (out of disk space) from one
-- that can again: a row written into this table after a TRUNCATE, so that it takes a new
-- page of the database's tablespace, as the writes that failed did.
--
-- No index: pruning walks events and deliveries by their keys, oldest first, and finds
-- terminal tasks through `tasks_status_created` (a task's last change is never before its
-- creation), so the webhook path pays for nothing new.
CREATE TABLE store_probe (
    probed_at TIMESTAMPTZ NOT NULL
);
