-- Access policy versions and node attributes.

-- Every policy ever set, oldest first; the highest version is in force. Rows are never changed
-- or deleted, so any earlier version can be read back (and re-set) later.
CREATE TABLE policies (
    version    INTEGER PRIMARY KEY AUTOINCREMENT,
    file_name  TEXT    NOT NULL,  -- the name it was set from, as used in its messages
    text       TEXT    NOT NULL,  -- the HuJSON exactly as submitted
    sha256     TEXT    NOT NULL,  -- hex digest of text
    set_at_ms  INTEGER NOT NULL,
    set_by     TEXT    NOT NULL   -- the actor, as in the audit log
);

CREATE TRIGGER policies_no_update BEFORE UPDATE ON policies
BEGIN
    SELECT RAISE(ABORT, 'policy versions are immutable');
END;

CREATE TRIGGER policies_no_delete BEFORE DELETE ON policies
BEGIN
    SELECT RAISE(ABORT, 'policy versions are immutable');
END;

-- Facts the node reports about itself (JSON object: "node:os", "node:diskEncrypted",
-- "fact:..." -> string, number or boolean) and when it last changed them.
ALTER TABLE nodes ADD COLUMN posture TEXT NOT NULL DEFAULT '{}';
ALTER TABLE nodes ADD COLUMN posture_at INTEGER;
-- Attributes admins set ("custom:..."), JSON object.
ALTER TABLE nodes ADD COLUMN custom_attrs TEXT NOT NULL DEFAULT '{}';
