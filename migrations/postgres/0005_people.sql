-- People who sign in through OpenID Connect (see migrations/sqlite/0011_people.sql).
CREATE TABLE users (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    issuer          TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    login_name      TEXT    NOT NULL UNIQUE,
    display_name    TEXT,
    groups          TEXT    NOT NULL DEFAULT '[]',
    key_expiry_s    BIGINT,
    created_at      BIGINT  NOT NULL,
    last_login_at   BIGINT  NOT NULL,
    UNIQUE (issuer, subject)
);

CREATE TABLE logins (
    state           TEXT    PRIMARY KEY,
    user_code       TEXT    NOT NULL UNIQUE,
    nonce           TEXT    NOT NULL,
    pkce_verifier   TEXT    NOT NULL,
    machine_key     TEXT    NOT NULL,
    hostname        TEXT    NOT NULL,
    source_ip       TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL,
    expires_at      BIGINT  NOT NULL,
    callback_at     BIGINT,
    user_id         BIGINT,
    mfa             BIGINT  NOT NULL DEFAULT 0,
    error           TEXT
);
CREATE INDEX logins_machine ON logins (machine_key);

ALTER TABLE nodes ADD COLUMN idp_groups TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN user_mfa BIGINT;

ALTER TABLE mesh ADD COLUMN key_expiry_s BIGINT;
ALTER TABLE mesh ADD COLUMN reauth_every_s BIGINT;
