-- Up to $5 prunable tasks ($1 to $4: see candidates.sql). Locked, so a task an
-- operator retries at this moment is either kept (the retry wins) or gone (the retry
-- finds nothing).
SELECT t.task_id
{CANDIDATES}
LIMIT $5 FOR UPDATE OF t SKIP LOCKED
