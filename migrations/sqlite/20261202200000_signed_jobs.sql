-- Signed jobs: the operator's signature (JSON: key, signature, expires_at, selector) and, in a
-- table of its own so that reading jobs stays cheap, the agent ids it was signed for. Keys
-- revoked fleet-wide, with the signed revocation the agents check themselves.
ALTER TABLE jobs ADD COLUMN signature TEXT;

CREATE TABLE job_signed_agents (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    agents TEXT NOT NULL
);

CREATE TABLE key_revocations (
    key        TEXT PRIMARY KEY,
    by_key     TEXT NOT NULL,
    signature  TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL
);
