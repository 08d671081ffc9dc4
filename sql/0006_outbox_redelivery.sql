-- sdrctl: no-transaction
-- Replies that did not go out: re-sent by the scheduler's outbox job. A partial index, so
-- finding them stays cheap however large the outbox grows.
-- When an undelivered reply may be tried again (backoff between tries).
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS retry_at timestamptz;
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_redeliver_idx ON outbox (id) WHERE status IN ('undelivered', 'sending');
