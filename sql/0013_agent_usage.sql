-- What the model billed (issue #18, usage and cost): tokens per agent call, from the API's
-- `usage` (or counted when it has none), and their cost at [agent] price_in/price_out per
-- million tokens (NULL when no price is set). On the turn, and on each reply thrown away:
-- both were paid for.
ALTER TABLE turns ADD COLUMN prompt_tokens integer;
ALTER TABLE turns ADD COLUMN completion_tokens integer;
ALTER TABLE turns ADD COLUMN cost numeric(14, 6);
ALTER TABLE discarded_replies ADD COLUMN prompt_tokens integer;
ALTER TABLE discarded_replies ADD COLUMN completion_tokens integer;
ALTER TABLE discarded_replies ADD COLUMN cost numeric(14, 6);
