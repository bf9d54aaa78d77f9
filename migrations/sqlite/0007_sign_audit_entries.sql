-- Audit entries and the head are signed (Ed25519) with the coordinator's audit key, which is
-- kept in the state dir and never in the database, so someone who can only write the
-- database cannot rewrite history undetected. Entries written before this carry no signature.
ALTER TABLE audit ADD COLUMN sig TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_head ADD COLUMN sig TEXT NOT NULL DEFAULT '';
