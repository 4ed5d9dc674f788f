-- The operator keys each agent's own config trusts, as it reported them in its last hello: a
-- JSON array of "ed25519:<hex>" strings, empty for an agent that runs unsigned jobs. The
-- agent decides; the server only shows it, so operators know a job must be signed.
ALTER TABLE agents ADD COLUMN trusted_keys TEXT NOT NULL DEFAULT '[]';
