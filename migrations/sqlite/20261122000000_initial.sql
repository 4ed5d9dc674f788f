-- Muster's first schema: operators' tokens, enrollment, agents and their liveness, heartbeat
-- history, and the audit log. Times are unix milliseconds (UTC). Never edit once landed: add a
-- new migration instead.

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    secret_hash  BLOB NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER,
    last_used_at INTEGER
);

CREATE TABLE enroll_tokens (
    id          TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    uses_total  INTEGER NOT NULL CHECK (uses_total > 0),
    uses_left   INTEGER NOT NULL CHECK (uses_left >= 0),
    labels      TEXT NOT NULL,            -- JSON object
    revoked_at  INTEGER
);

CREATE TABLE agents (
    id                    TEXT PRIMARY KEY,
    secret_hash           BLOB NOT NULL,
    enroll_token_id       TEXT,
    enrolled_at           INTEGER NOT NULL,
    revoked_at            INTEGER,
    hostname              TEXT NOT NULL,
    token_labels          TEXT NOT NULL,  -- JSON: labels set by the enrollment token
    labels                TEXT NOT NULL,  -- JSON: effective labels (agent's own under the token's)
    status                TEXT NOT NULL CHECK (status IN ('online', 'stale', 'offline')),
    status_since          INTEGER NOT NULL,
    heartbeat_interval_ms INTEGER,
    agent_version         TEXT,
    last_heartbeat_at     INTEGER,
    last_metrics          TEXT,           -- JSON: metrics of the last heartbeat
    connected             INTEGER NOT NULL DEFAULT 0,
    node                  TEXT,
    remote_addr           TEXT,
    connected_at          INTEGER,
    disconnected_at       INTEGER
);
CREATE INDEX agents_status ON agents (status);
CREATE INDEX agents_node ON agents (node) WHERE connected = 1;

CREATE TABLE agent_transitions (
    id          INTEGER PRIMARY KEY,
    agent_id    TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    at          INTEGER NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX agent_transitions_agent ON agent_transitions (agent_id, id);

-- No foreign key: rows are inserted in bulk by one writer, and pruned by age.
CREATE TABLE heartbeats (
    agent_id      TEXT NOT NULL,
    at            INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    cpu_percent   REAL NOT NULL,
    load1         REAL NOT NULL,
    mem_used      INTEGER NOT NULL,
    mem_total     INTEGER NOT NULL,
    disk_used     INTEGER NOT NULL,
    disk_total    INTEGER NOT NULL,
    process_count INTEGER NOT NULL
);
CREATE INDEX heartbeats_agent_at ON heartbeats (agent_id, at);
CREATE INDEX heartbeats_at ON heartbeats (at);

CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY,
    at     INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
