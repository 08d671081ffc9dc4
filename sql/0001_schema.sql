-- The pipeline's tables. schema_migrations is created by the migration runner itself.

CREATE TABLE leads (
    id               bigserial PRIMARY KEY,
    phone_number     text NOT NULL UNIQUE,
    push_name        text,                    -- the WhatsApp profile name
    name             text,                    -- the name the lead told us
    stage            text NOT NULL DEFAULT 'new',
    bill_value       numeric(12, 2),          -- monthly electricity bill, R$
    consumption_kwh  integer,
    solution         text,
    property_type    text,                    -- casa | apartamento | comercial | rural
    decision_maker   text,                    -- lead | compartilhada
    meeting_at       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversations (
    id               bigserial PRIMARY KEY,
    lead_id          bigint NOT NULL REFERENCES leads (id),
    phone_number     text NOT NULL,
    status           text NOT NULL DEFAULT 'open',
    started_at       timestamptz NOT NULL DEFAULT now(),
    last_message_at  timestamptz NOT NULL DEFAULT now()  -- set when opened; messages has the rest
);
-- One open conversation per lead: the intake finds or creates it in one statement.
CREATE UNIQUE INDEX conversations_open_lead_idx ON conversations (lead_id) WHERE status = 'open';

CREATE TABLE turns (
    id               bigserial PRIMARY KEY,
    lead_id          bigint NOT NULL REFERENCES leads (id),
    conversation_id  bigint NOT NULL REFERENCES conversations (id),
    messages_joined  integer NOT NULL,
    first_message_at timestamptz NOT NULL,    -- when we received the burst's first message
    last_message_at  timestamptz NOT NULL,    -- ... and its last
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz NOT NULL,
    buffer_wait_ms   double precision NOT NULL,  -- last message -> turn start
    window_ms        double precision,           -- the window the buffer gave the last message
    response_ms      double precision,        -- last message -> reply sent (null until sent)
    stages           jsonb NOT NULL DEFAULT '{}',   -- stage -> milliseconds
    timeouts         text[] NOT NULL DEFAULT '{}',  -- stages that timed out
    failures         text[] NOT NULL DEFAULT '{}',  -- stages that failed otherwise
    cache_hits       integer NOT NULL DEFAULT 0,
    cache_misses     integer NOT NULL DEFAULT 0,
    agent_backend    text NOT NULL,
    outcome          text NOT NULL            -- ok | fallback
);

CREATE TABLE messages (
    id               bigserial PRIMARY KEY,
    conversation_id  bigint NOT NULL REFERENCES conversations (id),
    lead_id          bigint NOT NULL REFERENCES leads (id),
    provider_id      text UNIQUE,             -- Evolution's key.id: de-duplication
    direction        text NOT NULL CHECK (direction IN ('in', 'out')),
    kind             text NOT NULL DEFAULT 'text',
    body             text NOT NULL DEFAULT '',
    media            jsonb,
    provider_ts      timestamptz NOT NULL,    -- messageTimestamp: orders a burst
    received_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    turn_id          bigint REFERENCES turns (id)   -- inbound: the turn that answered it
);
-- The buffer's source of truth: a lead's messages not answered yet.
CREATE INDEX messages_unanswered_idx ON messages (lead_id, provider_ts) WHERE direction = 'in' AND turn_id IS NULL;

CREATE TABLE knowledge_base (
    id          bigserial PRIMARY KEY,
    category    text NOT NULL,
    title       text NOT NULL,
    content     text NOT NULL,
    keywords    text NOT NULL DEFAULT '',
    tsv         tsvector GENERATED ALWAYS AS (
                    setweight(to_tsvector('portuguese', title), 'A') ||
                    setweight(to_tsvector('portuguese', keywords), 'B') ||
                    setweight(to_tsvector('portuguese', content), 'C')) STORED,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE follow_ups (
    id           bigserial PRIMARY KEY,
    lead_id      bigint NOT NULL REFERENCES leads (id),
    kind         text NOT NULL,
    due_at       timestamptz NOT NULL,
    status       text NOT NULL DEFAULT 'pending',   -- pending | executing | sent | failed | cancelled
    attempts     integer NOT NULL DEFAULT 0,
    payload      jsonb NOT NULL DEFAULT '{}',
    claimed_at   timestamptz,
    sent_at      timestamptz,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Every reply is written here in the turn's own transaction, then delivered: to the
-- Evolution API when one is configured (status sent/failed), else kept for `sdrctl chat`
-- (status local). The id is the idempotency key of the send.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    lead_id       bigint NOT NULL REFERENCES leads (id),
    turn_id       bigint REFERENCES turns (id),
    phone_number  text NOT NULL,
    body          text NOT NULL,
    status        text NOT NULL DEFAULT 'pending',  -- pending | sending | sent | failed | local
    attempts      integer NOT NULL DEFAULT 0,
    provider_id   text,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    sent_at       timestamptz
);
CREATE INDEX outbox_phone_idx ON outbox (phone_number, id);

-- The intake's write path, read-mostly: find or create the lead and its open conversation
-- (a known lead's rows are only read: no row lock, no dead tuple, no WAL per message) and
-- store the message once, de-duplicated on the provider's id. Returns the message, whether
-- it is new, whether it is still unanswered (so a retried webhook re-arms the buffer), and
-- the lead row when this call created or changed it (so the lead cache is written through).
CREATE FUNCTION ingest_message(
    p_phone text, p_push_name text, p_provider_id text, p_kind text, p_body text,
    p_media jsonb, p_provider_ts timestamptz,
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
