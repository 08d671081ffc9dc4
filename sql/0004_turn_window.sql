-- The buffer window that applied to a turn's last message, so the pipeline's own overhead
-- (response - window - agent) can be told apart from the wait we chose.
ALTER TABLE turns ADD COLUMN window_ms double precision;
