-- The `tasker.task` steps $1 wait for their children again: a child retried by the
-- step's retry policy (`$2` true: an attempt of the step, history `child_task_retried`)
-- or one that runs again (an operator retried it). Each step once. Returns the steps
-- and their children.
WITH input AS (
    SELECT i.step_id, i.retried
    FROM unnest($1::UUID[], $2::BOOLEAN[]) AS i(step_id, retried)
),
waiting AS (
    UPDATE steps s
    SET remaining_parents = 1,
        attempts = s.attempts + CASE WHEN i.retried THEN 1 ELSE 0 END,
        updated_at = now()
    FROM input i
    -- One primary-key probe per row (the transitions module's "Plans"): no index can
    -- serve the status test written with IS TRUE.
    WHERE s.step_id = i.step_id
      AND (s.status = 'pending') IS TRUE AND s.condition IS NOT NULL AND s.remaining_parents = 0
    RETURNING s.step_id, s.task_id, s.child_task_id, s.attempts, i.retried
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending', 'pending', 'child_task_retried',
           jsonb_build_object('child_task_id', child_task_id, 'attempt', attempts)
    FROM waiting
    WHERE retried
    ORDER BY step_id
)
SELECT step_id, child_task_id, retried FROM waiting
