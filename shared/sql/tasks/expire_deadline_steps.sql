-- Cancel the unfinished steps of the tasks $1, which `expire_deadlines.sql` ended at
-- their deadline in this transaction (a result still in flight is fenced out). Returns
-- those that were queued or running, with their dispatch tokens: workers are told to
-- drop them.
WITH cancelled AS (
    UPDATE steps s
    SET status = 'cancelled', lease_expires_at = NULL, next_attempt_at = NULL, held = NULL,
        held_task_key = NULL, completed_at = now(), updated_at = now()
    -- By task: no index can serve the status test written with IS TRUE (the
    -- transitions module's "Plans").
    FROM (SELECT o.step_id, o.status FROM steps o
          WHERE o.task_id = ANY ($1)
            AND (o.status IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')) IS TRUE
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
SELECT step_id, task_id, dispatch_token
FROM cancelled
WHERE from_status IN ('enqueued', 'in_progress')
