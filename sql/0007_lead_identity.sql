-- A lead is its WhatsApp identity: its phone number when known, else its LID jid
-- ("187654321098765@lid", which Evolution's sendText accepts as a number). Since Evolution
-- 2.3.5 a LID-addressed chat's remoteJid is the LID and the phone, when WhatsApp gives
-- it, comes in remoteJidAlt: the pair is learned here, so one person is one lead whichever
-- form their messages arrive in.
ALTER TABLE leads ADD COLUMN lid text;
CREATE UNIQUE INDEX leads_lid_idx ON leads (lid) WHERE lid IS NOT NULL;
-- Evolution answered `exists: false` for its number: no reply can reach it.
ALTER TABLE leads ADD COLUMN unreachable_at timestamptz;

-- Moving existing rows. Before this version a LID's digits were taken for a phone number
-- (so the lead was never answered). Such a lead is known by the jid its media key kept, or
-- by Evolution's `exists: false` answer to a 15-digit "number" no country uses (Brazil's
-- are 12-13 digits; E.164 allows 15, so only leads whose every reply failed that way).
WITH by_media AS (
    SELECT DISTINCT ON (m.lead_id) m.lead_id, m.media -> 'key' ->> 'remoteJid' AS jid
      FROM messages m
     WHERE m.media -> 'key' ->> 'remoteJid' LIKE '%@lid'
), by_answer AS (
    SELECT l.id AS lead_id, l.phone_number || '@lid' AS jid
      FROM leads l
     WHERE length(l.phone_number) = 15
       AND EXISTS (SELECT 1 FROM outbox o WHERE o.lead_id = l.id AND o.last_error LIKE '%"exists":false%')
       AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.lead_id = l.id AND o.status = 'sent')
), moved AS (
    SELECT lead_id, min(jid) AS jid FROM (SELECT * FROM by_media UNION SELECT * FROM by_answer) u
     GROUP BY lead_id
)
UPDATE leads l SET phone_number = moved.jid, lid = moved.jid, updated_at = now()
  FROM moved
 WHERE l.id = moved.lead_id AND l.phone_number NOT LIKE '%@%'
   AND NOT EXISTS (SELECT 1 FROM leads o WHERE o.phone_number = moved.jid);
UPDATE conversations c SET phone_number = l.phone_number
  FROM leads l WHERE c.lead_id = l.id AND c.phone_number <> l.phone_number;
-- Their replies that failed go out again, now to the LID jid.
UPDATE outbox o SET phone_number = l.phone_number, status = 'undelivered', attempts = 0
  FROM leads l
 WHERE o.lead_id = l.id AND l.lid IS NOT NULL AND o.phone_number <> l.phone_number AND o.status = 'failed';

-- One round trip when a message reveals a lead's LID and phone together: the pair is
-- stored on the phone's lead, and a lead known so far only by that LID becomes the phone's
-- lead (renamed, or merged into it with its history). Returns the identities whose lead
-- changed (their cache entries are stale).
CREATE FUNCTION link_lead_lid(p_phone text, p_lid text) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    v_lid_lead bigint;
    v_phone_lead bigint;
BEGIN
    SELECT id INTO v_phone_lead FROM leads WHERE phone_number = p_phone FOR UPDATE;
    IF FOUND AND EXISTS (SELECT 1 FROM leads WHERE id = v_phone_lead AND lid = p_lid) THEN
        RETURN '{}';  -- known already
    END IF;
    SELECT id INTO v_lid_lead FROM leads WHERE phone_number = p_lid FOR UPDATE;
    -- A LID names one account: whoever held it so far, it is set again below.
    UPDATE leads SET lid = NULL WHERE lid = p_lid;
    IF v_lid_lead IS NULL THEN
        INSERT INTO leads (phone_number, lid) VALUES (p_phone, p_lid)
        ON CONFLICT (phone_number) DO UPDATE SET lid = EXCLUDED.lid, updated_at = now();
        RETURN ARRAY[p_phone];
    END IF;
    IF v_phone_lead IS NULL THEN
        UPDATE leads SET phone_number = p_phone, lid = p_lid, updated_at = now() WHERE id = v_lid_lead;
        UPDATE conversations SET phone_number = p_phone WHERE lead_id = v_lid_lead;
        RETURN ARRAY[p_lid, p_phone];
    END IF;
    -- Both exist: the LID lead's history joins the phone's lead; what the phone's lead
    -- does not know yet, the LID lead may.
    UPDATE conversations SET status = 'closed'
     WHERE lead_id = v_lid_lead AND status = 'open'
       AND EXISTS (SELECT 1 FROM conversations WHERE lead_id = v_phone_lead AND status = 'open');
    UPDATE conversations SET lead_id = v_phone_lead, phone_number = p_phone WHERE lead_id = v_lid_lead;
    UPDATE messages SET lead_id = v_phone_lead WHERE lead_id = v_lid_lead;
    UPDATE turns SET lead_id = v_phone_lead WHERE lead_id = v_lid_lead;
    UPDATE outbox SET lead_id = v_phone_lead WHERE lead_id = v_lid_lead;
    UPDATE follow_ups SET lead_id = v_phone_lead WHERE lead_id = v_lid_lead;
    UPDATE leads p SET name = coalesce(p.name, o.name), bill_value = coalesce(p.bill_value, o.bill_value),
           consumption_kwh = coalesce(p.consumption_kwh, o.consumption_kwh),
           solution = coalesce(p.solution, o.solution), property_type = coalesce(p.property_type, o.property_type),
           decision_maker = coalesce(p.decision_maker, o.decision_maker),
           meeting_at = coalesce(p.meeting_at, o.meeting_at), lid = p_lid, updated_at = now()
      FROM leads o WHERE p.id = v_phone_lead AND o.id = v_lid_lead;
    DELETE FROM leads WHERE id = v_lid_lead;
    RETURN ARRAY[p_lid, p_phone];
END;
$$;
