-- Deliver the signal $2 with the payload $3 to the `tasker.wait` steps of task $1 that
-- wait for it (the caller holds the task's row; these rows are locked by id): one that
-- waits completes with the payload as results; one not waiting yet keeps the payload
-- and completes when it would start waiting. A step past its wait's timeout takes none:
-- it fails with `wait_timeout` at the next sweep. Returns the steps delivered to and
-- whether each completed.
WITH target AS (
    SELECT s.step_id
    FROM steps s
    WHERE s.task_id = $1 AND s.handler = 'tasker.wait' AND s.config ->> 'signal' = $2
      AND (s.status = 'pending') IS TRUE AND s.signalled_at IS NULL
      AND (s.wait_until > now()) IS NOT FALSE
    ORDER BY s.step_id
    FOR UPDATE
),
delivered AS (
    UPDATE steps s
    SET results = $3, signalled_at = now(),
        status = CASE WHEN s.wait_signal IS NOT NULL THEN 'complete' ELSE s.status END,
        remaining_parents = CASE WHEN s.wait_signal IS NOT NULL THEN 0
                                 ELSE s.remaining_parents END,
        condition = CASE WHEN s.wait_signal IS NOT NULL THEN NULL ELSE s.condition END,
        wait_until = NULL,
        completed_at = CASE WHEN s.wait_signal IS NOT NULL THEN now() END,
        updated_at = now()
    FROM target t
    WHERE s.step_id = t.step_id
    RETURNING s.step_id, s.task_id, s.status = 'complete' AS completed
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending', CASE WHEN completed THEN 'complete' ELSE 'pending' END,
           'signal_received', jsonb_build_object('signal', $2::TEXT)
    FROM delivered
    ORDER BY step_id
)
SELECT step_id, completed FROM delivered
