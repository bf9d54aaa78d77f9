-- Which machine each outside token admitted: a token is a bearer credential, and one copied
-- off a workload must not register a second machine. Rows go once the token has ended.
CREATE TABLE federation_tokens (
    token_hash   TEXT    PRIMARY KEY,   -- SHA-256 of the token
    machine_key  TEXT    NOT NULL,
    expires_at   INTEGER NOT NULL
);
