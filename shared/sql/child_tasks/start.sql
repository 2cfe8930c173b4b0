-- The `tasker.task` steps $1 (judged to run) start their children $2 (in the same
-- order), each an attempt of the step: the child is now their last parent still to
-- finish, and they keep their condition, so that the child's end hands them to the
-- coordinator again. Each step once: one another transaction started is left alone.
-- (Its task started when the claim handed the step over to be judged.) Returns the steps
-- started.
WITH input AS (
    SELECT i.step_id, i.child_task_id
    FROM unnest($1::UUID[], $2::UUID[]) AS i(step_id, child_task_id)
),
started AS (
    UPDATE steps s
    SET child_task_id = i.child_task_id, remaining_parents = 1, condition = 'true',
        attempts = s.attempts + 1, started_at = now(), updated_at = now()
    FROM input i
    -- One primary-key probe per row (the transitions module's "Plans"): no index can
    -- serve the status test written with IS TRUE.
    WHERE s.step_id = i.step_id
      AND (s.status = 'pending') IS TRUE AND s.condition IS NOT NULL AND s.remaining_parents = 0
      AND s.child_task_id IS NULL
    RETURNING s.step_id, s.task_id, s.child_task_id
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending', 'pending', 'child_task_started',
           jsonb_build_object('child_task_id', child_task_id)
    FROM started
    ORDER BY step_id
)
SELECT step_id FROM started
