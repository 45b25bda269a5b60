-- /metrics and the dashboard count tasks by provider, status and source on every scrape:
-- a covering index makes that a scan of small index entries instead of every task's JSON.
CREATE INDEX tasks_settled ON tasks (provider, status, source);
