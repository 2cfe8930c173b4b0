-- End up to $1 unfinished tasks past their deadline: `error` with the reason
-- `deadline_exceeded`, their unfinished steps `cancelled` (a result still in flight is
-- fenced out). Rows another coordinator holds are left to it; each task is ended once.
-- Returns each ended task, whether its template limits its tasks (its slots are freed by
-- the caller) and the dispatches (step, token) of its steps that were queued or running,
-- which workers are told to drop.
WITH due AS (
    SELECT t.task_id, t.status AS from_status
    FROM tasks t
    WHERE t.deadline_at <= now() AND t.status IN ('pending', 'in_progress')
    ORDER BY t.deadline_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
ended AS (
    UPDATE tasks t
    SET status = 'error', completed_at = now(), updated_at = now()
    FROM due d
    WHERE t.task_id = d.task_id
    RETURNING t.task_id, t.namespace, d.from_status, t.deadline_at,
              t.concurrency_keys IS NOT NULL AS limited, t.name,
              extract(epoch FROM t.completed_at - t.created_at)::FLOAT8 AS seconds
),
task_history AS (
    INSERT INTO task_transitions (task_id, from_status, to_status, reason, metadata)
    SELECT task_id, from_status, 'error', 'deadline_exceeded',
           jsonb_build_object('deadline', deadline_at)
    FROM ended
    ORDER BY task_id
),
cancelled AS (
    UPDATE steps s
    SET status = 'cancelled', lease_expires_at = NULL, next_attempt_at = NULL, held = NULL,
        held_task_key = NULL, completed_at = now(), updated_at = now()
    FROM (SELECT o.step_id, o.status FROM steps o
          WHERE o.task_id = ANY (ARRAY(SELECT task_id FROM ended))
            AND o.status IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')
          ORDER BY o.step_id FOR UPDATE) old
    WHERE s.step_id = old.step_id
    RETURNING s.step_id, s.task_id, s.dispatch_token, old.status AS from_status
),
step_history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason)
    SELECT step_id, task_id, from_status, 'cancelled', 'deadline_exceeded'
    FROM cancelled
    ORDER BY step_id
)
SELECT e.task_id, e.namespace, e.name, e.seconds, e.limited,
       ARRAY(SELECT c.step_id FROM cancelled c
             WHERE c.task_id = e.task_id AND c.from_status IN ('enqueued', 'in_progress')
             ORDER BY c.step_id) AS running_steps,
       ARRAY(SELECT c.dispatch_token FROM cancelled c
             WHERE c.task_id = e.task_id AND c.from_status IN ('enqueued', 'in_progress')
             ORDER BY c.step_id) AS running_tokens
FROM ended e
