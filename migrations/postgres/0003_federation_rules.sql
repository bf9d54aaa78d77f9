-- Workload identity federation (see migrations/sqlite/0009_federation_rules.sql).
CREATE TABLE federation_rules (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- never reused
    issuer          TEXT    NOT NULL,
    audience        TEXT    NOT NULL,
    matches         TEXT    NOT NULL,
    tags            TEXT    NOT NULL,
    ephemeral       BIGINT  NOT NULL,
    max_lifetime_s  BIGINT,
    created_at      BIGINT  NOT NULL,
    created_by      TEXT    NOT NULL
);
