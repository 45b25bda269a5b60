-- Due polls by provider. While one provider cannot take more polls (its connections busy
-- with a backlog), the reconciler loop leases each other provider's due tasks by themselves
-- instead of taking that backlog from the head of a single time-ordered index and handing
-- it back. The earliest due poll overall is the earliest of each provider's (a handful of
-- index lookups, `sqlite.py` `_DUE_HEADS`), so this one index replaces the old one: a
-- second one would be written at every lease and every poll.
DROP INDEX tasks_due;
CREATE INDEX tasks_due ON tasks (provider, next_poll_at) WHERE next_poll_at IS NOT NULL;
