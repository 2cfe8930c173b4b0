-- The steps a batch of results ($1) answers, as the decision needs them, with whether
-- their task's template has limits (`keyed`) and, for an instance, its `for_each` step.
-- By primary key
-- only (the transitions module's "Plans"); the caller already holds the rows
-- (lock_batch), and takes them again here in id order if it does not.
SELECT s.step_id, s.task_id, t.namespace, t.keyed,
       s.status, s.dispatch_token, s.attempts, s.retry_limit, s.retryable, s.deferrals,
       s.max_deferrals, s.backoff_base_ms, s.backoff_max_ms, s.backoff_jitter,
       s.backoff_schedule_ms, s.ready_at, s.fan_out_of
FROM steps s
CROSS JOIN LATERAL (SELECT k.namespace, k.keyed FROM tasks k
                    WHERE k.task_id = s.task_id OFFSET 0) t
WHERE s.step_id = ANY ($1)
ORDER BY s.step_id
FOR UPDATE OF s
