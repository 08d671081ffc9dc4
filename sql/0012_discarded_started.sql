-- When a thrown-away reply's turn started (issue #16): with the turns' own start and
-- written_at, every execution of a lead's turn has an interval, and no two may overlap
-- (the race suite checks it) unless one stopped on its own fence (reason lapsed/fenced).
ALTER TABLE discarded_replies ADD COLUMN started_at timestamptz;
