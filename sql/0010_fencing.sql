-- Fencing (issue #16). The lead lock in Redis keeps two turns of a lead apart, but a
-- process paused past the lock's TTL (GC, a stalled VM) still believes it holds it. So a
-- turn, and a follow-up's send, first takes a token from the lead's row, newer than every
-- token before it; their writes are accepted only with the lead's newest token (and a
-- turn's only for messages no turn answered yet). The token lives where the data is
-- written: a Redis counter would start again at 1 after Redis lost its data, and every
-- later turn of the lead would be refused.
ALTER TABLE leads ADD COLUMN fence bigint NOT NULL DEFAULT 0;
ALTER TABLE turns ADD COLUMN fence bigint;  -- the token the turn was written with
-- A turn stopped by its fence wrote nothing, but its agent call was paid for: recorded
-- with the replies thrown away.
ALTER TABLE discarded_replies DROP CONSTRAINT discarded_replies_reason_check;
ALTER TABLE discarded_replies ADD CONSTRAINT discarded_replies_reason_check
    CHECK (reason IN ('newer_message', 'typing', 'lapsed', 'fenced'));
-- When the turn was written: a message that arrived later is the next burst's by the
-- buffer's rules (the fault and race suites tell such a split from one the rules forbid).
-- The default is set apart from the ADD so existing rows are not rewritten.
ALTER TABLE turns ADD COLUMN written_at timestamptz;
ALTER TABLE turns ALTER COLUMN written_at SET DEFAULT clock_timestamp();
