-- Workload identity federation: tokens from these issuers, for this audience, whose claims
-- match every pattern, may join with these tags (see coordinator/src/federation.rs).
CREATE TABLE federation_rules (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused
    issuer          TEXT    NOT NULL,
    audience        TEXT    NOT NULL,
    matches         TEXT    NOT NULL,   -- JSON array of {"claim", "pattern"}
    tags            TEXT    NOT NULL,   -- JSON array
    ephemeral       INTEGER NOT NULL,
    max_lifetime_s  INTEGER,
    created_at      INTEGER NOT NULL,
    created_by      TEXT    NOT NULL
);
