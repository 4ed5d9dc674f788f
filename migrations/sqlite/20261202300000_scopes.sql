-- Scoped operator tokens: a label selector (as written) that bounds which agents a token sees
-- and targets; NULL for the whole fleet. A job keeps the scope of the token that created it,
-- so the dispatcher can check each run's agent again before sending it.
ALTER TABLE api_tokens ADD COLUMN scope TEXT;
ALTER TABLE jobs ADD COLUMN scope TEXT;
