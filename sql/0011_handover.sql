-- Humans in the loop and leads' rights (issue #17).
-- A paused lead's messages are stored and not answered: a consultant wrote to it from the
-- business phone ('operator'), the bot handed it to a person ('handoff'), or an operator
-- paused it ('cli'). The bot is back when paused_until passes, or on `sdrctl leads resume`.
ALTER TABLE leads ADD COLUMN paused_until timestamptz;
ALTER TABLE leads ADD COLUMN paused_by text;
ALTER TABLE leads ADD COLUMN paused_at timestamptz;
-- The lead asked not to be messaged: no follow-up is planned while this is set (a message
-- from the lead is still answered). Cleared when the lead opts in again.
ALTER TABLE leads ADD COLUMN opted_out_at timestamptz;
-- Never answered (staff, partners, test phones): `sdrctl leads ignore`, besides the
-- numbers in sdr.toml's [handover] ignore.
ALTER TABLE leads ADD COLUMN ignored boolean NOT NULL DEFAULT false;

-- What happened to a lead, counted by `sdrctl report` and /metrics. `sdrctl leads forget`
-- keeps these rows without the lead (lead_id NULL): the counts survive the erasure, the
-- person does not.
CREATE TABLE lead_events (
    id      bigserial PRIMARY KEY,
    lead_id bigint REFERENCES leads (id) ON DELETE SET NULL,
    kind    text NOT NULL CHECK (kind IN (
                'takeover', 'handoff', 'opt_out', 'opt_in', 'paused', 'resumed', 'ignored',
                'suppressed', 'forgotten')),
    actor   text NOT NULL,  -- 'operator' (the business phone), 'lead', 'bot' or 'cli'
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX lead_events_at_idx ON lead_events (at);
CREATE INDEX lead_events_lead_idx ON lead_events (lead_id);
