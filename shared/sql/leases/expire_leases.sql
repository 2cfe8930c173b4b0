-- Heal up to $1 steps past their lease: `enqueued` ones always, `in_progress` ones
-- only when $2, and not those whose worker is among $4 (heard from lately) while they
-- are within their timeout plus the lease grace ($3 ms): their heartbeats are late, not
-- their worker gone.
WITH expired AS (
    SELECT step_id, status AS from_status, dispatch_token,
           -- When it may run again: at once if it never started, after its
           -- backoff if its worker was lost, never if that was its last attempt.
           CASE
               WHEN status = 'enqueued' THEN now()
               WHEN NOT retryable OR attempts >= retry_limit THEN NULL
               ELSE now() + tasker_backoff_ms(attempts, NULL, backoff_base_ms,
                                              backoff_max_ms, backoff_jitter,
                                              backoff_schedule_ms)
                            * interval '1 millisecond'
           END AS next_attempt_at
    FROM steps
    WHERE (status = 'enqueued'
           OR (status = 'in_progress' AND $2
               AND NOT (COALESCE(worker_id = ANY ($4::text[]), false)
                        AND now() < started_at + (timeout_ms + $3) * interval '1 millisecond')))
      AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
updated AS (
    UPDATE steps s
    SET status = CASE
            WHEN e.from_status = 'enqueued' THEN 'waiting_for_retry'
            WHEN NOT s.retryable OR s.attempts >= s.retry_limit THEN 'error'
            ELSE 'waiting_for_retry'
        END,
        attempts = CASE WHEN e.from_status = 'enqueued' THEN s.attempts - 1
                        ELSE s.attempts END,
        next_attempt_at = e.next_attempt_at,
        ready_at = e.next_attempt_at,
        last_error = CASE
            WHEN e.from_status = 'in_progress' THEN jsonb_build_object(
                'kind', 'timeout', 'code', 'lease_expired',
                'message', 'no result from the worker within timeout_ms plus the lease grace')
            ELSE s.last_error
        END,
        completed_at = CASE WHEN e.from_status = 'in_progress'
                                 AND (NOT s.retryable OR s.attempts >= s.retry_limit)
                            THEN now() END,
        lease_expires_at = NULL,
        updated_at = now()
    FROM expired e
    WHERE s.step_id = e.step_id
    RETURNING s.step_id, s.task_id, s.status AS to_status, s.attempts, e.from_status,
              e.dispatch_token
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, from_status, to_status,
           CASE WHEN from_status = 'enqueued' THEN 'lease_lost' ELSE 'lease_expired' END,
           jsonb_build_object('attempt', attempts)
    FROM updated
)
SELECT u.step_id, u.task_id, t.namespace, u.from_status, u.to_status, u.dispatch_token
FROM updated u JOIN tasks t ON t.task_id = u.task_id
