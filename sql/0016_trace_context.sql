-- Traces (issue #20): a lead message keeps the W3C traceparent of the webhook that stored it
-- (NULL with tracing off), so the turn that answers its burst links to those webhooks'
-- spans whichever daemon runs the turn. ingest_message takes it as an eighth argument;
-- ingest_many (the intake's one statement per batch) passes the batch's `trace` key, and
-- is called as before, so a daemon of the previous version still ingests (with no trace).
ALTER TABLE messages ADD COLUMN trace_context text;

DROP FUNCTION ingest_message(text, text, text, text, text, jsonb, timestamptz);

CREATE FUNCTION ingest_message(
    p_phone text, p_push_name text, p_provider_id text, p_kind text, p_body text,
    p_media jsonb, p_provider_ts timestamptz, p_trace text,
    OUT message_id bigint, OUT inserted boolean, OUT unanswered boolean, OUT lead jsonb
) LANGUAGE plpgsql AS $$
DECLARE
    v_lead bigint;
    v_push text;
    v_conv bigint;
BEGIN
    SELECT m.id, false, m.turn_id IS NULL INTO message_id, inserted, unanswered
      FROM messages m WHERE m.provider_id = p_provider_id;
    IF FOUND THEN
        RETURN;
    END IF;

    SELECT l.id, l.push_name INTO v_lead, v_push FROM leads l WHERE l.phone_number = p_phone;
    IF NOT FOUND THEN
        INSERT INTO leads (phone_number, push_name) VALUES (p_phone, p_push_name)
        ON CONFLICT (phone_number) DO UPDATE
            SET push_name = COALESCE(EXCLUDED.push_name, leads.push_name), updated_at = now()
        RETURNING id, to_jsonb(leads.*) INTO v_lead, lead;
    ELSIF p_push_name IS NOT NULL AND v_push IS DISTINCT FROM p_push_name THEN
        UPDATE leads SET push_name = p_push_name, updated_at = now() WHERE id = v_lead
        RETURNING to_jsonb(leads.*) INTO lead;
    END IF;

    SELECT c.id INTO v_conv FROM conversations c WHERE c.lead_id = v_lead AND c.status = 'open';
    IF NOT FOUND THEN
        INSERT INTO conversations (lead_id, phone_number) VALUES (v_lead, p_phone)
        ON CONFLICT (lead_id) WHERE status = 'open' DO UPDATE SET last_message_at = now()
        RETURNING id INTO v_conv;
    END IF;

    INSERT INTO messages (conversation_id, lead_id, provider_id, direction, kind, body, media, provider_ts, trace_context)
    VALUES (v_conv, v_lead, p_provider_id, 'in', p_kind, p_body, p_media, p_provider_ts, p_trace)
    ON CONFLICT (provider_id) DO NOTHING
    RETURNING id INTO message_id;

    IF message_id IS NULL THEN   -- a concurrent delivery of the same message won the race
        SELECT m.id, m.turn_id IS NULL INTO message_id, unanswered
          FROM messages m WHERE m.provider_id = p_provider_id;
        inserted := false;
    ELSE
        inserted := true;
        unanswered := true;
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION ingest_many(p_batch jsonb)
RETURNS TABLE (n bigint, message_id bigint, inserted boolean, unanswered boolean, lead jsonb)
LANGUAGE sql AS $$
    SELECT e.n, r.message_id, r.inserted, r.unanswered, r.lead
      FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e(doc, n),
           LATERAL ingest_message(
               e.doc ->> 'phone', e.doc ->> 'push_name', e.doc ->> 'provider_id',
               e.doc ->> 'kind', e.doc ->> 'body', e.doc -> 'media',
               (e.doc ->> 'provider_ts')::timestamptz, e.doc ->> 'trace') AS r
     ORDER BY e.n
$$;
