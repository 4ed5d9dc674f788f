-- An agent's recent runs (GET /api/v1/agents/{id}/runs) without scanning every run ever made.
CREATE INDEX runs_by_agent ON runs (agent_id);
