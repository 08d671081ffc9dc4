-- 1M generated turns over the last 30 days, for 5,000 leads: the data behind the
-- "report on 1M turns" figure in BENCHMARKS.md. Run it on a throw-away database only
-- (it empties the tables): psql "$SDR_DATABASE_URL" -f scripts/seed_turns.sql
TRUNCATE leads, conversations, messages, turns, outbox, follow_ups RESTART IDENTITY CASCADE;
INSERT INTO leads (phone_number, push_name)
SELECT '5511' || lpad(i::text, 9, '0'), 'Lead ' || i FROM generate_series(1, 5000) i;
INSERT INTO conversations (lead_id, phone_number) SELECT id, phone_number FROM leads;
INSERT INTO turns (lead_id, conversation_id, messages_joined, first_message_at, last_message_at,
                   started_at, finished_at, buffer_wait_ms, window_ms, response_ms, stages,
                   timeouts, failures, cache_hits, cache_misses, agent_backend, outcome)
SELECT 1 + i % 5000, 1 + i % 5000, 1 + i % 3,
       f - make_interval(secs => r / 1000.0 + 2), f - make_interval(secs => r / 1000.0),
       f - make_interval(secs => r / 1000.0 - 1), f, 1000, 1000, r,
       jsonb_build_object('context', 5 + i % 50, 'agent', r - 1100, 'store', 2 + i % 7, 'send', 10 + i % 90),
       CASE WHEN i % 100 = 0 THEN '{agent}'::text[] ELSE '{}' END, '{}',
       i % 5, 1, 'simulated', CASE WHEN i % 100 = 0 THEN 'fallback' ELSE 'ok' END
  FROM generate_series(1, 1000000) i,
       LATERAL (SELECT now() - interval '30 days' + i * interval '30 days' / 1000000 AS f,
                       1200 + (i::bigint * 7919) % 9000 AS r) x;
ANALYZE turns;
