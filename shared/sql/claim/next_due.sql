-- When the next step in backoff falls due: the claim rule with the clock left out. A step
-- held by a concurrency limit is not waiting for a time (a freed slot wakes the
-- dispatcher), whatever its next_attempt_at says: a delayed task's first step held for
-- its template's key keeps its past run_at, and counting it would have the dispatcher
-- look again every few milliseconds for as long as it waits.
SELECT min(next_attempt_at)
FROM steps
WHERE tasker_step_claimable(status, remaining_parents, NULL, attempts, retry_limit)
  AND next_attempt_at IS NOT NULL
  AND held IS DISTINCT FROM 'concurrency_limited'
