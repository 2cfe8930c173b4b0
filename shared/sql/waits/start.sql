-- The `tasker.wait` steps $1 (judged to run) start waiting, each for the signal of its
-- config, for at most $2 ms (NULL: no timeout): the signal is their last parent still to
-- finish. One whose signal already came completes at once, with its payload as results.
-- Each step once. Returns the steps and whether each completed.
WITH input AS (
    SELECT i.step_id, i.timeout_ms
    FROM unnest($1::UUID[], $2::BIGINT[]) AS i(step_id, timeout_ms)
),
started AS (
    UPDATE steps s
    SET wait_signal = s.config ->> 'signal',
        wait_until = CASE WHEN s.signalled_at IS NULL
                          THEN now() + i.timeout_ms * INTERVAL '1 millisecond' END,
        remaining_parents = CASE WHEN s.signalled_at IS NULL THEN 1 ELSE 0 END,
        status = CASE WHEN s.signalled_at IS NULL THEN 'pending' ELSE 'complete' END,
        condition = CASE WHEN s.signalled_at IS NULL THEN s.condition END,
        completed_at = CASE WHEN s.signalled_at IS NOT NULL THEN now() END,
        updated_at = now()
    FROM input i
    -- One primary-key probe per row (the transitions module's "Plans"): no index can
    -- serve the status test written with IS TRUE.
    WHERE s.step_id = i.step_id
      AND (s.status = 'pending') IS TRUE AND s.condition IS NOT NULL AND s.remaining_parents = 0
    RETURNING s.step_id, s.task_id, s.status = 'complete' AS completed, s.wait_signal,
              s.wait_until
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending', CASE WHEN completed THEN 'complete' ELSE 'pending' END,
           CASE WHEN completed THEN 'signal_received' ELSE 'waiting_for_signal' END,
           jsonb_strip_nulls(jsonb_build_object('signal', wait_signal, 'until', wait_until))
    FROM started
    ORDER BY step_id
)
SELECT step_id, task_id, completed FROM started
