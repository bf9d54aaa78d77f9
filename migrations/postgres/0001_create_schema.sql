-- Lattice coordinator schema (PostgreSQL): the same tables, columns and constraints as
-- migrations/sqlite (0001-0007 together). Never edit an applied migration; add a new file, to
-- both directories. Integers are BIGINT (flags 0/1, unix seconds or milliseconds), binary
-- digests BYTEA.

-- One row: mesh-wide settings chosen when the mesh is created.
CREATE TABLE mesh (
    id               BIGINT  PRIMARY KEY CHECK (id = 1),
    domain           TEXT    NOT NULL,
    ula_prefix       TEXT    NOT NULL,
    next_ipv4        BIGINT  NOT NULL,
    created_at       BIGINT  NOT NULL,
    tunnel_security  TEXT    NOT NULL DEFAULT 'post_quantum'
);

CREATE TABLE auth_keys (
    id            TEXT    PRIMARY KEY,
    secret_hash   BYTEA   NOT NULL,    -- BLAKE2s of the secret; the secret is never stored
    reusable      BIGINT  NOT NULL,
    ephemeral     BIGINT  NOT NULL,
    tags          TEXT    NOT NULL,
    user_name     TEXT,
    created_at    BIGINT  NOT NULL,
    created_by    TEXT    NOT NULL,
    expires_at    BIGINT  NOT NULL,
    revoked_at    BIGINT,
    used_count    BIGINT  NOT NULL DEFAULT 0,
    last_used_at  BIGINT
);

CREATE TABLE nodes (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- never reused
    machine_key     TEXT    NOT NULL UNIQUE,
    node_key        TEXT    NOT NULL,
    name            TEXT    NOT NULL UNIQUE,
    ipv4            BIGINT  NOT NULL UNIQUE,
    ipv6            TEXT    NOT NULL UNIQUE,
    user_name       TEXT,
    tags            TEXT    NOT NULL,
    ephemeral       BIGINT  NOT NULL,
    auth_key_id     TEXT,
    os              TEXT    NOT NULL DEFAULT '',
    client_version  TEXT    NOT NULL DEFAULT '',
    endpoints       TEXT    NOT NULL DEFAULT '[]',
    created_at      BIGINT  NOT NULL,
    last_seen       BIGINT,
    expires_at      BIGINT,
    posture         TEXT    NOT NULL DEFAULT '{}',
    posture_at      BIGINT,
    custom_attrs    TEXT    NOT NULL DEFAULT '{}',
    home_relay      BIGINT,
    nat             TEXT
);

-- A node key belongs to one node (see migrations/sqlite/0005).
CREATE UNIQUE INDEX nodes_node_key ON nodes (node_key);

CREATE TABLE removed_machines (
    machine_key  TEXT    PRIMARY KEY,
    node_name    TEXT    NOT NULL,
    removed_at   BIGINT  NOT NULL,
    reason       TEXT    NOT NULL
);

CREATE TABLE admin_tokens (
    id           TEXT    PRIMARY KEY,
    secret_hash  BYTEA   NOT NULL,
    created_at   BIGINT  NOT NULL,
    created_by   TEXT    NOT NULL,
    revoked_at   BIGINT,
    scope        TEXT    NOT NULL DEFAULT 'write',
    expires_at   BIGINT
);

-- Append-only, hash-chained, signed audit log; audit_head anchors the end of the chain.
CREATE TABLE audit (
    seq        BIGINT  PRIMARY KEY,
    at_ms      BIGINT  NOT NULL,
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    target     TEXT    NOT NULL,
    detail     TEXT    NOT NULL,
    prev_hash  TEXT    NOT NULL,
    hash       TEXT    NOT NULL,
    sig        TEXT    NOT NULL DEFAULT ''
);

CREATE TABLE audit_head (
    id    BIGINT  PRIMARY KEY CHECK (id = 1),
    seq   BIGINT  NOT NULL,
    hash  TEXT    NOT NULL,
    sig   TEXT    NOT NULL DEFAULT ''
);

CREATE FUNCTION lattice_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0];
END;
$$;

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION lattice_refuse('audit log is append-only');
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION lattice_refuse('audit log is append-only');
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION lattice_refuse('audit log is append-only');

-- Every policy ever set, oldest first; the highest version is in force.
CREATE TABLE policies (
    version    BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    file_name  TEXT    NOT NULL,
    text       TEXT    NOT NULL,
    sha256     TEXT    NOT NULL,
    set_at_ms  BIGINT  NOT NULL,
    set_by     TEXT    NOT NULL
);

CREATE TRIGGER policies_no_update BEFORE UPDATE ON policies
    FOR EACH ROW EXECUTE FUNCTION lattice_refuse('policy versions are immutable');
CREATE TRIGGER policies_no_delete BEFORE DELETE ON policies
    FOR EACH ROW EXECUTE FUNCTION lattice_refuse('policy versions are immutable');
CREATE TRIGGER policies_no_truncate BEFORE TRUNCATE ON policies
    FOR EACH STATEMENT EXECUTE FUNCTION lattice_refuse('policy versions are immutable');

-- Standalone relays registered by admins.
CREATE TABLE relays (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         TEXT    NOT NULL UNIQUE,
    relay_key    TEXT    NOT NULL,
    quic         TEXT,
    cert_sha256  TEXT,
    websocket    TEXT,
    stun         TEXT    NOT NULL DEFAULT '[]',
    created_at   BIGINT  NOT NULL,
    created_by   TEXT    NOT NULL
);
