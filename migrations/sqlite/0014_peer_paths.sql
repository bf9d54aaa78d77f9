-- The paths a node reports to its peers (direct, relayed and why), shown by `nodes list` and
-- the web console, and when it last reported them.
ALTER TABLE nodes ADD COLUMN paths TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN paths_at BIGINT;
