-- Retention (SPEC §5) and the full-disk check (SPEC §4).
--
-- New event seqs and delivery ids continue from the largest stored ones (sqlite.py
-- `_NEXT_IDS`). Pruning may remove the newest rows too (every event of a quiet log, the
-- newest deliveries of settled tasks), so it records here the largest seq and id it ever
-- removed, and numbering continues after those: no number is ever given twice, and a
-- reader's cursor never points into a reused range. `probed_at` is written by the write
-- probe that tells a store which failed to commit (a full disk) from one that can again.
--
-- No index: pruning walks events and deliveries by their keys, oldest first, and finds
-- terminal tasks through `tasks_status_created` (a task's last change is never before its
-- creation), so the webhook path pays for nothing new.
CREATE TABLE store_state (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_seq      INTEGER NOT NULL,
    pruned_delivery INTEGER NOT NULL,
    probed_at       REAL
);
INSERT INTO store_state (id, pruned_seq, pruned_delivery) VALUES (1, 0, 0);
