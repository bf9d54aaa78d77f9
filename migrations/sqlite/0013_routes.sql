-- Subnet routers and exit nodes: what each node offers to route (from its hello), and what
-- an admin approved (`nodes routes NAME --approve CIDR`). The policy's autoApprovers approve
-- more, computed when the policy is compiled.
ALTER TABLE nodes ADD COLUMN advertised_routes TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN approved_routes TEXT NOT NULL DEFAULT '[]';
