-- The steps a batch of results ($1) answers, as the decision needs them. By primary key
-- only (the transitions module's "Plans"); the caller already holds the rows
-- (lock_batch), and takes them again here in id order if it does not.
SELECT s.step_id, s.task_id, (SELECT t.namespace FROM tasks t WHERE t.task_id = s.task_id) AS namespace,
       s.status, s.dispatch_token, s.attempts, s.retry_limit, s.retryable, s.deferrals,
       s.max_deferrals, s.backoff_base_ms, s.backoff_max_ms, s.backoff_jitter,
       s.backoff_schedule_ms, s.ready_at
FROM steps s
WHERE s.step_id = ANY ($1)
ORDER BY s.step_id
FOR UPDATE OF s
