-- Jobs and their runs: one run per agent a job's target matched. A job and all its runs are
-- committed before anything is sent to an agent.

CREATE TABLE jobs (
    id           TEXT PRIMARY KEY,
    created_at   INTEGER NOT NULL,
    created_by   TEXT NOT NULL,
    target       TEXT NOT NULL,          -- JSON: the target as written
    command      TEXT NOT NULL,          -- JSON: program, cwd, env
    timeout_ms   INTEGER NOT NULL,
    ttl_ms       INTEGER NOT NULL,
    concurrency  TEXT,                   -- as written: "10" or "25%"
    max_in_flight INTEGER,               -- concurrency resolved against the matched agents
    max_errors   INTEGER,
    output_limit INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,       -- runs still waiting for an offline agent expire then
    cancelled_at INTEGER,
    finished_at  INTEGER
);
CREATE INDEX jobs_active ON jobs (created_at) WHERE finished_at IS NULL;

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL REFERENCES jobs (id),
    agent_id         TEXT NOT NULL,
    seq              INTEGER NOT NULL,   -- dispatch order within the job
    state            TEXT NOT NULL CHECK (state IN ('pending', 'dispatched', 'running', 'succeeded', 'failed',
                                                    'timed_out', 'cancelled', 'expired', 'skipped', 'lost')),
    accepted         INTEGER NOT NULL DEFAULT 0,  -- the agent confirmed it holds the run in its ledger
    dispatched_at    INTEGER,
    started_at       INTEGER,
    finished_at      INTEGER,
    exit_code        INTEGER,
    signal           INTEGER,
    error            TEXT,
    stdout_len       INTEGER,            -- as reported by the agent at the end
    stderr_len       INTEGER,
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job_id, agent_id)
);
CREATE INDEX runs_job ON runs (job_id, seq);
CREATE INDEX runs_open_by_agent ON runs (agent_id) WHERE state IN ('pending', 'dispatched', 'running');

-- Output in chunks keyed by byte offset: a chunk sent twice is stored once, and overlapping
-- chunks are stitched together when read.
CREATE TABLE run_output (
    run_id TEXT NOT NULL,
    stream INTEGER NOT NULL,             -- 0 stdout, 1 stderr
    offset INTEGER NOT NULL,
    data   TEXT NOT NULL,
    PRIMARY KEY (run_id, stream, offset)
) WITHOUT ROWID;
