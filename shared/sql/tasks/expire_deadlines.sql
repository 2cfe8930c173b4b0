-- End up to $1 unfinished tasks past their deadline: `error` with the reason
-- `deadline_exceeded` (their steps are cancelled by `expire_deadline_steps.sql`). Rows
-- another coordinator holds are left to it; each task is ended once. Returns each ended
-- task and whether its template limits its tasks (its slots are freed by the caller).
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
)
SELECT e.task_id, e.namespace, e.name, e.seconds, e.limited
FROM ended e
