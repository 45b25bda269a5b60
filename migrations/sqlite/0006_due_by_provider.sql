-- Due polls per provider. When one provider cannot take more polls now (all its connections
-- busy with a backlog), the reconciler loop leases the others' due tasks by provider instead
-- of taking that provider's backlog from the head of `tasks_due` and handing it back.
CREATE INDEX tasks_due_by_provider ON tasks (provider, next_poll_at)
    WHERE next_poll_at IS NOT NULL;
