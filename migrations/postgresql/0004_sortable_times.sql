-- SQLite's 0004 rewrites stored times with a fixed six-digit fraction and strips the seq
-- from stored event bodies. A PostgreSQL database never held either: its times are
-- TIMESTAMPTZ columns, and every task and event in it was written (or copied from a
-- migrated SQLite database) in today's form. Nothing to do.
SELECT 1;
