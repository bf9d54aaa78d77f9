-- How tunnels are keyed mesh-wide: 'post_quantum' (default) or 'classical_only' (an explicit,
-- audited admin choice, e.g. for interop with stock WireGuard peers).
ALTER TABLE mesh ADD COLUMN tunnel_security TEXT NOT NULL DEFAULT 'post_quantum';
