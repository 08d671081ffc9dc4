-- Follow-ups executed exactly once, by any daemon: a step number for sequences
-- (re-engagement 1, 2, then nurturing), the time of the last change, and the outbox row
-- that carried each one. Plus the CRM push's watermark.
ALTER TABLE follow_ups ADD COLUMN step integer NOT NULL DEFAULT 1;
ALTER TABLE follow_ups ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE outbox ADD COLUMN follow_up_id bigint REFERENCES follow_ups (id);

-- A lead's open follow-ups (cancelled when the lead writes again, or by an operator).
CREATE INDEX follow_ups_lead_open_idx ON follow_ups (lead_id) WHERE status IN ('pending', 'executing');
-- Follow-ups whose daemon died mid-send: reclaimed after [followups] stuck_after.
CREATE INDEX follow_ups_executing_idx ON follow_ups (claimed_at) WHERE status = 'executing';

-- Leads changed after pushed_until have not reached the CRM yet.
CREATE TABLE crm_sync (
    id            integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    pushed_until  timestamptz NOT NULL
);
CREATE INDEX leads_updated_at_idx ON leads (updated_at);
