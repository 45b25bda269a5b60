-- SQLite's 0003 moves `tasks` to a rowid table, which PostgreSQL's heap tables already are.
-- Nothing reads deliveries by task; the index only cost a random insert per delivery.
DROP INDEX deliveries_task;
