-- Standalone relays registered by admins (the coordinator's embedded relay is not stored; it
-- is always relay 0 in netmaps).
CREATE TABLE relays (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL UNIQUE,
    relay_key    TEXT    NOT NULL,          -- relaykey:<hex>
    quic         TEXT,                      -- ip:port
    cert_sha256  TEXT,                      -- hex
    websocket    TEXT,                      -- http://host:port/relay
    stun         TEXT    NOT NULL DEFAULT '[]', -- JSON array of ip:port
    created_at   INTEGER NOT NULL,
    created_by   TEXT    NOT NULL
);

-- What a node reports about its network: its home relay and its NAT's behaviour (JSON).
ALTER TABLE nodes ADD COLUMN home_relay INTEGER;
ALTER TABLE nodes ADD COLUMN nat TEXT;
