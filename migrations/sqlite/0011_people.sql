-- People who sign in through the mesh's OpenID Connect provider (see coordinator/src/oidc.rs).
-- The provider's issuer and subject are the identity; the login name (the e-mail, or
-- SUBJECT@ISSUER-HOST without one) is how policies and nodes name the user.
CREATE TABLE users (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    issuer          TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    login_name      TEXT    NOT NULL UNIQUE,
    display_name    TEXT,
    groups          TEXT    NOT NULL DEFAULT '[]',  -- JSON array, from the last sign-in
    key_expiry_s    INTEGER,                        -- this user's node key lifetime (NULL: the mesh's)
    created_at      INTEGER NOT NULL,
    last_login_at   INTEGER NOT NULL,
    UNIQUE (issuer, subject)
);

-- Sign-ins in progress (a device flow in front of the provider's authorization code flow).
-- A row is claimed once by the provider's callback (callback_at), then holds the outcome.
CREATE TABLE logins (
    state           TEXT    PRIMARY KEY,
    user_code       TEXT    NOT NULL UNIQUE,
    nonce           TEXT    NOT NULL,
    pkce_verifier   TEXT    NOT NULL,
    machine_key     TEXT    NOT NULL,
    hostname        TEXT    NOT NULL,
    source_ip       TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    callback_at     INTEGER,
    user_id         INTEGER,
    mfa             INTEGER NOT NULL DEFAULT 0,
    error           TEXT
);
CREATE INDEX logins_machine ON logins (machine_key);

-- What the node's user's sign-in said, for the policy: the provider's groups and whether a
-- second factor was used (NULL: the node did not join by signing in).
ALTER TABLE nodes ADD COLUMN idp_groups TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN user_mfa INTEGER;

-- How long user-owned node keys last, and how often users must sign in again (seconds;
-- NULL: the default of 180 days, and no extra re-authentication).
ALTER TABLE mesh ADD COLUMN key_expiry_s INTEGER;
ALTER TABLE mesh ADD COLUMN reauth_every_s INTEGER;
