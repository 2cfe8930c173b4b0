-- A task's ($1) steps in template order, each with the names of its parents.
SELECT s.step_id, s.name, s.handler, s.status, s.attempts, s.retry_limit, s.deferrals,
       s.retryable,
       s.timeout_ms, s.results, s.last_error, s.next_attempt_at, s.started_at,
       s.completed_at,
       ARRAY(SELECT p.name FROM step_edges e JOIN steps p ON p.step_id = e.from_step
             WHERE e.to_step = s.step_id ORDER BY p.position) AS depends_on
FROM steps s
WHERE s.task_id = $1
ORDER BY s.position
