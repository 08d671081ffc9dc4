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
    last_message_at  timestamptz NOT NULL DEFAULT now()
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
    buffer_wait_ms   double precision NOT NULL,
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
CREATE INDEX messages_conversation_created_idx ON messages (conversation_id, received_at);
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
CREATE INDEX knowledge_base_tsv_idx ON knowledge_base USING gin (tsv);

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
CREATE INDEX follow_ups_due_idx ON follow_ups (due_at) WHERE status = 'pending';

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

-- The intake's single round trip: find or create the lead and its open conversation,
-- store the message once (de-duplicated on the provider's id). Returns the message, whether
-- it is new, and whether it is still unanswered (so a retried webhook re-arms the buffer).
CREATE FUNCTION ingest_message(
    p_phone text, p_push_name text, p_provider_id text, p_kind text, p_body text,
    p_media jsonb, p_provider_ts timestamptz,
    OUT message_id bigint, OUT inserted boolean, OUT unanswered boolean
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
        SET push_name = COALESCE(EXCLUDED.push_name, leads.push_name)
    RETURNING id INTO v_lead;

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
