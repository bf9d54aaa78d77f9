-- A node key belongs to one node: a node must not be able to claim another node's WireGuard
-- key (it would take its place in netmaps and at relays). Nodes also prove they hold their key
-- in the control handshake; this constraint is the database's half of that guarantee.
-- Rows that already share a key (possible only before this constraint) keep it on the oldest
-- node; the others get a placeholder nobody holds and must reconnect with their real key.
UPDATE nodes SET node_key = printf('nodekey:%064x', id)
 WHERE id NOT IN (SELECT MIN(id) FROM nodes GROUP BY node_key);
CREATE UNIQUE INDEX nodes_node_key ON nodes (node_key);
