-- The rules of DESIGN.md "Readiness and retries" as SQL functions, so an operator (and
-- the API) can ask for one task, in one call, why each step is or is not running.

-- How long to wait before the next attempt, in milliseconds.
-- A handler's retry_after wins, capped by the step's maximum; otherwise the step's
-- schedule (attempt n waits schedule[n], the last entry repeating), otherwise
-- min(base * 2^(attempt-1), max), with "equal jitter" (50-100% of that) when enabled.
CREATE FUNCTION tasker_backoff_ms(
    attempt INT,
    retry_after_seconds DOUBLE PRECISION,
    base_ms BIGINT,
    max_ms BIGINT,
    jitter BOOLEAN,
    schedule_ms BIGINT[]
) RETURNS DOUBLE PRECISION LANGUAGE sql VOLATILE AS $$
    SELECT CASE
        WHEN retry_after_seconds IS NOT NULL
            THEN least(greatest(retry_after_seconds, 0) * 1000, max_ms)
        WHEN schedule_ms IS NOT NULL AND cardinality(schedule_ms) > 0
            THEN schedule_ms[least(greatest(attempt, 1), cardinality(schedule_ms))]::DOUBLE PRECISION
        ELSE least(base_ms * power(2::DOUBLE PRECISION, greatest(attempt - 1, 0)), max_ms)
             * CASE WHEN jitter THEN 0.5 + random() * 0.5 ELSE 1 END
    END
$$;

-- Per step of one task: is it ready, and if not, why not.
CREATE FUNCTION tasker_step_readiness(p_task_id UUID)
RETURNS TABLE (
    step_id UUID,
    name TEXT,
    status TEXT,
    ready BOOLEAN,
    waiting_on TEXT[],
    next_attempt_at TIMESTAMPTZ,
    attempts INT,
    retry_limit INT,
    reason TEXT,
    message TEXT
) LANGUAGE sql STABLE AS $$
    WITH parents AS (
        SELECT s.step_id,
               COALESCE(array_agg(p.name ORDER BY p.position)
                   FILTER (WHERE p.status NOT IN ('complete', 'resolved_manually')), '{}') AS waiting_on,
               COALESCE(array_agg(p.name ORDER BY p.position)
                   FILTER (WHERE p.status IN ('error', 'cancelled')), '{}') AS failed_parents
        FROM steps s
        LEFT JOIN step_edges e ON e.to_step = s.step_id
        LEFT JOIN steps p ON p.step_id = e.from_step
        WHERE s.task_id = p_task_id
        GROUP BY s.step_id
    ),
    judged AS (
        SELECT s.step_id, s.name, s.status, s.position, pa.waiting_on, s.next_attempt_at,
               s.attempts, s.retry_limit, s.last_error, s.deferrals, s.max_deferrals,
               CASE
                   WHEN t.status = 'cancelled' AND s.status NOT IN ('complete', 'resolved_manually')
                       THEN 'task_cancelled'
                   WHEN s.status = 'complete' THEN 'complete'
                   WHEN s.status = 'resolved_manually' THEN 'resolved_manually'
                   WHEN s.status = 'cancelled' THEN 'cancelled'
                   WHEN s.status = 'enqueued' THEN 'enqueued'
                   WHEN s.status = 'in_progress' THEN 'running'
                   WHEN s.status = 'error' AND s.last_error ->> 'code' = 'deferral_limit'
                       THEN 'deferrals_exhausted'
                   WHEN s.status = 'error' AND s.attempts >= s.retry_limit
                        AND COALESCE(s.last_error ->> 'kind', '') <> 'permanent'
                       THEN 'attempts_exhausted'
                   WHEN s.status = 'error' THEN 'failed_permanently'
                   WHEN cardinality(pa.failed_parents) > 0 THEN 'blocked_by_failed_parent'
                   WHEN cardinality(pa.waiting_on) > 0 THEN 'waiting_on_parents'
                   WHEN s.next_attempt_at > now() THEN 'in_backoff'
                   WHEN s.attempts >= s.retry_limit THEN 'attempts_exhausted'
                   ELSE 'ready'
               END AS reason,
               pa.failed_parents
        FROM steps s
        JOIN tasks t ON t.task_id = s.task_id
        JOIN parents pa ON pa.step_id = s.step_id
        WHERE s.task_id = p_task_id
    )
    SELECT step_id, name, status, reason = 'ready', waiting_on, next_attempt_at, attempts,
           retry_limit, reason,
           CASE reason
               WHEN 'task_cancelled' THEN 'the task was cancelled; nothing more runs'
               WHEN 'complete' THEN 'finished successfully'
               WHEN 'resolved_manually' THEN 'resolved by an operator'
               WHEN 'cancelled' THEN 'cancelled'
               WHEN 'enqueued' THEN 'dispatched (attempt ' || attempts || '); waiting for a worker to take it'
               WHEN 'running' THEN 'running on a worker (attempt ' || attempts || ' of ' || retry_limit || ')'
               WHEN 'deferrals_exhausted' THEN 'deferred ' || deferrals || ' times, the limit; resolve or retry the task'
               WHEN 'attempts_exhausted' THEN 'all ' || retry_limit || ' attempts failed; last error: '
                                              || COALESCE(last_error ->> 'message', 'unknown')
               WHEN 'failed_permanently' THEN 'failed permanently: ' || COALESCE(last_error ->> 'message', 'unknown')
               WHEN 'blocked_by_failed_parent' THEN 'cannot run: parent ' || array_to_string(failed_parents, ', ')
                                                   || ' failed'
               WHEN 'waiting_on_parents' THEN 'waiting on ' || array_to_string(waiting_on, ', ')
               WHEN 'in_backoff' THEN 'attempt ' || (attempts + 1) || ' of ' || retry_limit || ' after backoff, at '
                                      || to_char(next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
               ELSE 'ready to be dispatched'
           END
    FROM judged
    ORDER BY position
$$;

-- One task's execution context, as tasker-engine's get_task_execution_context, with
-- blocked_by_failures checked before has_ready_steps (its successor's fix: the other
-- order hid failures while parallel branches still ran).
CREATE FUNCTION tasker_task_execution_context(p_task_id UUID)
RETURNS TABLE (
    total_steps BIGINT,
    pending_steps BIGINT,
    enqueued_steps BIGINT,
    in_progress_steps BIGINT,
    completed_steps BIGINT,
    waiting_for_retry_steps BIGINT,
    failed_steps BIGINT,
    cancelled_steps BIGINT,
    ready_steps BIGINT,
    execution_status TEXT,
    recommended_action TEXT,
    health TEXT,
    completion_percentage DOUBLE PRECISION
) LANGUAGE sql STABLE AS $$
    WITH counts AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE s.status = 'pending') AS pending,
               count(*) FILTER (WHERE s.status = 'enqueued') AS enqueued,
               count(*) FILTER (WHERE s.status = 'in_progress') AS in_progress,
               count(*) FILTER (WHERE s.status IN ('complete', 'resolved_manually')) AS done,
               count(*) FILTER (WHERE s.status = 'waiting_for_retry') AS retrying,
               count(*) FILTER (WHERE s.status = 'error') AS failed,
               count(*) FILTER (WHERE s.status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE s.status IN ('pending', 'waiting_for_retry')
                                  AND s.remaining_parents = 0
                                  AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= now())
                                  AND s.attempts < s.retry_limit) AS ready,
               count(*) FILTER (WHERE s.status IN ('pending', 'waiting_for_retry')
                                  AND s.remaining_parents = 0) AS runnable
        FROM steps s
        WHERE s.task_id = p_task_id
    ),
    judged AS (
        SELECT c.*, t.status AS task_status,
               CASE
                   WHEN t.status = 'cancelled' THEN 'cancelled'
                   WHEN c.total > 0 AND c.done = c.total THEN 'all_complete'
                   WHEN c.failed > 0 AND c.enqueued + c.in_progress + c.runnable = 0
                       THEN 'blocked_by_failures'
                   WHEN c.ready > 0 THEN 'has_ready_steps'
                   WHEN c.enqueued + c.in_progress > 0 THEN 'processing'
                   ELSE 'waiting_for_dependencies'
               END AS execution_status
        FROM counts c CROSS JOIN tasks t
        WHERE t.task_id = p_task_id
    )
    SELECT total, pending, enqueued, in_progress, done, retrying, failed, cancelled, ready,
           execution_status,
           CASE execution_status
               WHEN 'cancelled' THEN 'none'
               WHEN 'all_complete' THEN CASE WHEN task_status = 'complete' THEN 'none' ELSE 'finalize_task' END
               WHEN 'blocked_by_failures' THEN 'handle_failures'
               WHEN 'has_ready_steps' THEN 'execute_ready_steps'
               WHEN 'processing' THEN 'wait_for_completion'
               ELSE 'wait_for_dependencies'
           END,
           CASE
               WHEN execution_status = 'cancelled' THEN 'unknown'
               WHEN failed + retrying = 0 THEN 'healthy'
               WHEN execution_status = 'blocked_by_failures' THEN 'blocked'
               ELSE 'recovering'
           END,
           CASE WHEN total = 0 THEN 0 ELSE round(100.0 * done / total, 2)::DOUBLE PRECISION END
    FROM judged
$$;
