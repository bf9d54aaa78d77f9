-- The paths a node reports to its peers (see migrations/sqlite/0014_peer_paths.sql).
ALTER TABLE nodes ADD COLUMN paths TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN paths_at BIGINT;
