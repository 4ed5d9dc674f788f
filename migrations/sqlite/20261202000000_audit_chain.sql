-- The audit log becomes a hash chain (docs/audit.md): each entry records the peer's address
-- and carries the hash of the entry before it and its own. Rows written before this migration
-- keep NULL hashes: the chain starts at a genesis entry the server writes with the first new
-- entry, which records how many unchained entries came before it.
ALTER TABLE audit_log ADD COLUMN address TEXT;
ALTER TABLE audit_log ADD COLUMN prev_hash TEXT;
ALTER TABLE audit_log ADD COLUMN hash TEXT;

-- The chain's head: one row, read and updated in the transaction that appends an entry, so
-- appends from several server processes form one chain. `hash` is '' until the genesis entry
-- is written; `id` is the id the last entry took (ids never go back, even after pruning).
CREATE TABLE audit_head (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    id   INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (one, id, hash) VALUES (1, COALESCE((SELECT MAX(id) FROM audit_log), 0), '');

-- Filters of GET /api/v1/audit, newest first.
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_actor ON audit_log (actor, id);
CREATE INDEX audit_log_action ON audit_log (action, id);
CREATE INDEX audit_log_target ON audit_log (target, id);

-- Retention: finished jobs, oldest first.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
