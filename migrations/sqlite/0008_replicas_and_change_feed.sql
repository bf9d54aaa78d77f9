-- Several coordinator replicas can share one database (PostgreSQL). Every committed change that
-- nodes must hear about gets a row in `changes`, numbered under the write lock, so numbers
-- follow commit order without gaps; each replica applies the rows in order to its in-memory
-- view (a cache, never the truth) and nodes hear of a change only after it committed.
CREATE TABLE changes (
    seq      INTEGER PRIMARY KEY,
    at_ms    INTEGER NOT NULL,
    kind     TEXT    NOT NULL,            -- node | policy | relays | settings | replicas
    node_id  INTEGER,                     -- for kind = node
    detail   TEXT    NOT NULL DEFAULT ''  -- JSON: what a kicked node is told, if anything
);

-- The coordinator processes serving this mesh now, with their public URLs (sent to nodes so
-- they can fail over) and a heartbeat; one that stops beating is dropped by the others.
CREATE TABLE replicas (
    id            TEXT    PRIMARY KEY,
    public_url    TEXT,
    relay         TEXT,               -- JSON: its embedded relay, if it runs one
    started_ms    INTEGER NOT NULL,
    heartbeat_ms  INTEGER NOT NULL
);

-- Which replica holds the node's control session (NULL: none).
ALTER TABLE nodes ADD COLUMN connected_to TEXT;

-- The mesh's public keys, set by the first replica: every replica must hold the same control,
-- ticket and audit keys (nodes pin the control key, relays trust the ticket key, the audit
-- chain is signed with the audit key).
ALTER TABLE mesh ADD COLUMN control_key TEXT;
ALTER TABLE mesh ADD COLUMN ticket_key TEXT;
ALTER TABLE mesh ADD COLUMN audit_key TEXT;
