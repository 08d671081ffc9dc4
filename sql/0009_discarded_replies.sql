-- Replies the agent wrote and nobody read: with [buffer] speculate the agent starts when a
-- lead's window closes, and a reply overtaken by a newer message of the lead is thrown away
-- (the whole burst is answered again). Each is an agent call paid for (an LLM bills it), so
-- each is recorded: "agent calls per turn" = (turns + discarded replies) / turns.
CREATE TABLE discarded_replies (
    id bigserial PRIMARY KEY,
    lead_id bigint NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    discarded_at timestamptz NOT NULL DEFAULT now(),
    message_ids bigint[] NOT NULL,        -- the burst the reply answered
    reason text NOT NULL CHECK (reason IN ('newer_message', 'typing')),
    agent_ms double precision             -- what the thrown-away call took
);
CREATE INDEX discarded_replies_at_idx ON discarded_replies (discarded_at);
CREATE INDEX discarded_replies_lead_idx ON discarded_replies (lead_id);
