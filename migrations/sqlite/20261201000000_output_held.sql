-- How much of each stream the server holds without a gap, kept on the run itself so that a
-- chunk is judged without reading every stored chunk (server/src/output.rs has the rule).
-- Existing runs get the end of their furthest chunk, which is what they hold when their
-- chunks have no gap (the old writer stored gaps, so this is an upper bound for those).
ALTER TABLE runs ADD COLUMN stdout_held INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN stderr_held INTEGER NOT NULL DEFAULT 0;
UPDATE runs SET
    stdout_held = COALESCE((SELECT MAX(o.offset + length(CAST(o.data AS BLOB))) FROM run_output o
                            WHERE o.run_id = runs.id AND o.stream = 0), 0),
    stderr_held = COALESCE((SELECT MAX(o.offset + length(CAST(o.data AS BLOB))) FROM run_output o
                            WHERE o.run_id = runs.id AND o.stream = 1), 0)
WHERE EXISTS (SELECT 1 FROM run_output o WHERE o.run_id = runs.id);
