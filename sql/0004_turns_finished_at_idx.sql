-- sdrctl: no-transaction
-- `sdrctl report` and `tune recommend` select turns by when they finished: without this
-- index every report scans the whole turns table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS turns_finished_at_idx ON turns (finished_at);
