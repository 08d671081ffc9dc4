-- sdrctl: no-transaction
-- Replies whose send may have arrived ('uncertain': a timeout, a 5xx) are re-delivered
-- only after Evolution's history says they did not: the re-delivery index covers them.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_redeliver_pending_idx ON outbox (id)
    WHERE status IN ('undelivered', 'sending', 'uncertain');
DROP INDEX CONCURRENTLY IF EXISTS outbox_redeliver_idx;
