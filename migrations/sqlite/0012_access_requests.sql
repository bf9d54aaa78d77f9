-- Just-in-time access: a node asks for ports on a destination for a while, with a reason; a
-- person the policy names approves (the grant then lasts `duration_s` from the approval) or
-- denies. Rows stay as the record of who asked, who decided and when.
CREATE TABLE access_requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id      INTEGER NOT NULL,
    node_name    TEXT    NOT NULL,
    user_name    TEXT,
    dst          TEXT    NOT NULL,
    ports        TEXT    NOT NULL,
    duration_s   INTEGER NOT NULL,
    reason       TEXT    NOT NULL,
    status       TEXT    NOT NULL,   -- pending, approved, denied, expired
    created_at   INTEGER NOT NULL,
    decided_by   TEXT,
    decided_at   INTEGER,
    expires_at   INTEGER             -- approved: when the grant ends
);
CREATE INDEX access_requests_status ON access_requests (status);
