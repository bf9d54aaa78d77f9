-- Admin tokens get a scope ('read': GET only; 'write': every admin change except token
-- management, which stays on the local socket) and an expiry. Tokens created before this had
-- neither: they keep 'write' and expire 30 days from this migration.
ALTER TABLE admin_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'write';
ALTER TABLE admin_tokens ADD COLUMN expires_at INTEGER;
UPDATE admin_tokens SET expires_at = CAST(strftime('%s', 'now') AS INTEGER) + 30 * 86400
 WHERE expires_at IS NULL;
