-- See migrations/sqlite/0010_federation_tokens.sql.
CREATE TABLE federation_tokens (
    token_hash   TEXT    PRIMARY KEY,
    machine_key  TEXT    NOT NULL,
    expires_at   BIGINT  NOT NULL
);
