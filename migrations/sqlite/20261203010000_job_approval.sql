-- A second approver for large jobs: a job that matches more agents than the server's
-- approval_above waits, undispatched, until an admin other than its creator approves it.
ALTER TABLE jobs ADD COLUMN approval_required INTEGER NOT NULL DEFAULT 0;
-- The id of the operator token that created the job: the one token that cannot approve it.
ALTER TABLE jobs ADD COLUMN creator_token TEXT;
ALTER TABLE jobs ADD COLUMN approved_by TEXT;
ALTER TABLE jobs ADD COLUMN approved_at INTEGER;
