-- Steps ready to run but not yet dispatched (held steps are counted apart:
-- held_steps.sql), by namespace, with how long the oldest has waited (since its backoff
-- ended, or it became ready).
SELECT t.namespace, count(*) AS ready,
       extract(epoch FROM now() - min(COALESCE(s.next_attempt_at, s.ready_at, s.created_at)))::FLOAT8
           AS oldest_seconds
FROM steps s JOIN tasks t ON t.task_id = s.task_id
WHERE s.status IN ('pending', 'waiting_for_retry') AND s.remaining_parents = 0
  AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= now())
  AND s.held IS NULL
GROUP BY t.namespace
