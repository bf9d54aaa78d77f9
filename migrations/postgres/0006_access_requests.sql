-- Just-in-time access (see migrations/sqlite/0012_access_requests.sql).
CREATE TABLE access_requests (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node_id      BIGINT  NOT NULL,
    node_name    TEXT    NOT NULL,
    user_name    TEXT,
    dst          TEXT    NOT NULL,
    ports        TEXT    NOT NULL,
    duration_s   BIGINT  NOT NULL,
    reason       TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    decided_by   TEXT,
    decided_at   BIGINT,
    expires_at   BIGINT
);
CREATE INDEX access_requests_status ON access_requests (status);
