-- Lattice coordinator schema (SQLite). Never edit an applied migration; add a new file.

-- One row: mesh-wide settings chosen when the mesh is created.
CREATE TABLE mesh (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    domain      TEXT    NOT NULL,
    ula_prefix  TEXT    NOT NULL,  -- the mesh's IPv6 ULA /48, e.g. fd5e:1a2b:3c4d::/48
    next_ipv4   INTEGER NOT NULL,  -- next host offset to try inside 100.64.0.0/10
    created_at  INTEGER NOT NULL   -- unix seconds
);

CREATE TABLE auth_keys (
    id            TEXT    PRIMARY KEY,          -- 12 hex digits, public
    secret_hash   BLOB    NOT NULL,             -- BLAKE2s of the secret; the secret is never stored
    reusable      INTEGER NOT NULL,
    ephemeral     INTEGER NOT NULL,
    tags          TEXT    NOT NULL,             -- JSON array of "tag:..."
    user_name     TEXT,
    created_at    INTEGER NOT NULL,
    created_by    TEXT    NOT NULL,
    expires_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    used_count    INTEGER NOT NULL DEFAULT 0,
    last_used_at  INTEGER
);

CREATE TABLE nodes (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused
    machine_key     TEXT    NOT NULL UNIQUE,
    node_key        TEXT    NOT NULL,
    name            TEXT    NOT NULL UNIQUE,
    ipv4            INTEGER NOT NULL UNIQUE,           -- host-order u32
    ipv6            TEXT    NOT NULL UNIQUE,
    user_name       TEXT,
    tags            TEXT    NOT NULL,                  -- JSON array
    ephemeral       INTEGER NOT NULL,
    auth_key_id     TEXT,
    os              TEXT    NOT NULL DEFAULT '',
    client_version  TEXT    NOT NULL DEFAULT '',
    endpoints       TEXT    NOT NULL DEFAULT '[]',     -- JSON array of "ip:port"
    created_at      INTEGER NOT NULL,
    last_seen       INTEGER,
    expires_at      INTEGER                            -- node key expiry; NULL = never
);

-- Machines an admin removed, so a reconnect gets a clear "removed" instead of "unknown".
CREATE TABLE removed_machines (
    machine_key  TEXT    PRIMARY KEY,
    node_name    TEXT    NOT NULL,
    removed_at   INTEGER NOT NULL,
    reason       TEXT    NOT NULL
);

CREATE TABLE admin_tokens (
    id           TEXT    PRIMARY KEY,
    secret_hash  BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    created_by   TEXT    NOT NULL,
    revoked_at   INTEGER
);

-- Append-only, hash-chained audit log. Each row's hash covers its content and the previous
-- row's hash; audit_head anchors the end of the chain so truncation is detectable too.
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    at_ms      INTEGER NOT NULL,
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    target     TEXT    NOT NULL,
    detail     TEXT    NOT NULL,  -- JSON object
    prev_hash  TEXT    NOT NULL,
    hash       TEXT    NOT NULL
);

CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  TEXT    NOT NULL
);

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;
