-- Replicas and the change feed (see migrations/sqlite/0008).
CREATE TABLE changes (
    seq      BIGINT  PRIMARY KEY,
    at_ms    BIGINT  NOT NULL,
    kind     TEXT    NOT NULL,
    node_id  BIGINT,
    detail   TEXT    NOT NULL DEFAULT ''
);

CREATE TABLE replicas (
    id            TEXT    PRIMARY KEY,
    public_url    TEXT,
    relay         TEXT,
    started_ms    BIGINT  NOT NULL,
    heartbeat_ms  BIGINT  NOT NULL
);

ALTER TABLE nodes ADD COLUMN connected_to TEXT;

ALTER TABLE mesh ADD COLUMN control_key TEXT;
ALTER TABLE mesh ADD COLUMN ticket_key TEXT;
ALTER TABLE mesh ADD COLUMN audit_key TEXT;
