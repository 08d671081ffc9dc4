-- sdrctl: no-transaction
-- The hot path's indexes (the set from the seed analysis), built CONCURRENTLY so this runs
-- on a live database without blocking writes. A build that fails leaves an INVALID index;
-- `sdrctl migrate` drops it and builds it again. `sdrctl migrate verify` checks the plans.
--
-- leads(phone_number) is already covered by the UNIQUE constraint of 0001 (a second
-- index would only slow writes down), and a lead's open conversation by
-- conversations_open_lead_idx.

CREATE INDEX CONCURRENTLY IF NOT EXISTS conversations_phone_idx ON conversations (phone_number);

-- A conversation's last N messages (ids grow with arrival, so the id orders them).
CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_conversation_id_idx ON messages (conversation_id, id);

CREATE INDEX CONCURRENTLY IF NOT EXISTS knowledge_base_category_idx ON knowledge_base (category);

-- Full-text search: tsv is the 'portuguese' tsvector of title, keywords and content.
CREATE INDEX CONCURRENTLY IF NOT EXISTS knowledge_base_tsv_idx ON knowledge_base USING gin (tsv);

-- Due follow-ups, oldest first.
CREATE INDEX CONCURRENTLY IF NOT EXISTS follow_ups_due_idx ON follow_ups (due_at) WHERE status = 'pending';
