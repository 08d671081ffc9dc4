-- When the intake creates or changes a lead it returns the row, so the lead cache is
-- written through (a new lead's first turn then reads it from cache, not Postgres).
DROP FUNCTION ingest_message(text, text, text, text, text, jsonb, timestamptz);

CREATE FUNCTION ingest_message(
    p_phone text, p_push_name text, p_provider_id text, p_kind text, p_body text,
    p_media jsonb, p_provider_ts timestamptz,
    OUT message_id bigint, OUT inserted boolean, OUT unanswered boolean, OUT lead jsonb
) LANGUAGE plpgsql AS $$
DECLARE
    v_lead bigint;
    v_conv bigint;
BEGIN
    SELECT m.id, false, m.turn_id IS NULL INTO message_id, inserted, unanswered
      FROM messages m WHERE m.provider_id = p_provider_id;
    IF FOUND THEN
        RETURN;
    END IF;

    INSERT INTO leads (phone_number, push_name) VALUES (p_phone, p_push_name)
    ON CONFLICT (phone_number) DO UPDATE
        SET push_name = EXCLUDED.push_name, updated_at = now()
        WHERE EXCLUDED.push_name IS NOT NULL AND leads.push_name IS DISTINCT FROM EXCLUDED.push_name
    RETURNING id, to_jsonb(leads.*) INTO v_lead, lead;
    IF v_lead IS NULL THEN
        SELECT id INTO v_lead FROM leads WHERE phone_number = p_phone;
    END IF;

    INSERT INTO conversations (lead_id, phone_number) VALUES (v_lead, p_phone)
    ON CONFLICT (lead_id) WHERE status = 'open' DO UPDATE SET last_message_at = now()
    RETURNING id INTO v_conv;

    INSERT INTO messages (conversation_id, lead_id, provider_id, direction, kind, body, media, provider_ts)
    VALUES (v_conv, v_lead, p_provider_id, 'in', p_kind, p_body, p_media, p_provider_ts)
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
