-- Steps ready to run but not yet dispatched (held steps are counted apart:
-- held_steps.sql).
SELECT count(*) FROM steps
WHERE status IN ('pending', 'waiting_for_retry') AND remaining_parents = 0
  AND (next_attempt_at IS NULL OR next_attempt_at <= now())
  AND held IS NULL
