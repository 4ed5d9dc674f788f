-- Finding runs still in progress (for overdue checks) without scanning every run ever made.
CREATE INDEX runs_open ON runs (state) WHERE state IN ('pending', 'dispatched', 'running');
