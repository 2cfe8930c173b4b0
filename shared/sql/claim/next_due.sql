-- When the next step in backoff falls due: the claim rule with the clock left out.
SELECT min(next_attempt_at)
FROM steps
WHERE tasker_step_claimable(status, remaining_parents, NULL, attempts, retry_limit)
  AND next_attempt_at IS NOT NULL
