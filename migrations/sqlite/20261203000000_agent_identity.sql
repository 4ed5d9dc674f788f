-- Agent identity over time: credential rotation (with the retired credentials kept to spot a
-- cloned machine), and enrollment tokens whose agents wait for an administrator's approval.

-- A credential issued to the agent and not yet confirmed stored: until then the old one works.
ALTER TABLE agents ADD COLUMN pending_secret_hash BLOB;
ALTER TABLE agents ADD COLUMN pending_issued_at INTEGER;
-- When the current credential was issued (NULL: at enrollment).
ALTER TABLE agents ADD COLUMN credential_issued_at INTEGER;
-- An administrator asked for a rotation that has not happened yet.
ALTER TABLE agents ADD COLUMN rotation_requested_at INTEGER;
-- The last time a retired credential of this agent was presented, and from where.
ALTER TABLE agents ADD COLUMN clone_seen_at INTEGER;
ALTER TABLE agents ADD COLUMN clone_seen_from TEXT;
-- 1 while the agent waits for an administrator to accept it; it gets no runs until then.
ALTER TABLE agents ADD COLUMN approval_pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN accepted_at INTEGER;
ALTER TABLE agents ADD COLUMN accepted_by TEXT;

ALTER TABLE enroll_tokens ADD COLUMN approve INTEGER NOT NULL DEFAULT 0;

-- Credentials replaced by a rotation, newest few per agent: presenting one is a clone's mark.
CREATE TABLE agent_retired_credentials (
    agent_id    TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    secret_hash BLOB NOT NULL,
    retired_at  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, secret_hash)
);
