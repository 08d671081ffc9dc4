-- Group commit: the intake stores a batch of messages from concurrent webhooks in one round
-- trip and one transaction. Results come back in the batch's order (n).
CREATE FUNCTION ingest_many(p_batch jsonb)
RETURNS TABLE (n bigint, message_id bigint, inserted boolean, unanswered boolean, lead jsonb)
LANGUAGE sql AS $$
    SELECT e.n, r.message_id, r.inserted, r.unanswered, r.lead
      FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e(doc, n),
           LATERAL ingest_message(
               e.doc ->> 'phone', e.doc ->> 'push_name', e.doc ->> 'provider_id',
               e.doc ->> 'kind', e.doc ->> 'body', e.doc -> 'media',
               (e.doc ->> 'provider_ts')::timestamptz) AS r
     ORDER BY e.n
$$;
