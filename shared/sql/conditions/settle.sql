-- Write what the conditions of the steps $1 gave ($2: `true`, `false`, `untriggered` (a
-- `one_failed` step none of whose parents failed: skipped) or `error`, with
-- the message $3 and code $4): true clears the condition (the step is claimed next),
-- false skips the step, an error fails it permanently (`expression_error`, or the code
-- given: `fan_out_too_large` for a `for_each` list too long, `results_too_large` for
-- instances' results too large together) and keeps the condition, so
-- that an operator's retry judges it again. Each step once: one whose condition another
-- transaction settled is left alone. Returns the steps changed.
WITH input AS (
    SELECT i.step_id, i.outcome, i.message, COALESCE(i.code, 'expression_error') AS code
    FROM unnest($1::UUID[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) AS i(step_id, outcome, message, code)
),
changed AS (
    UPDATE steps s
    SET condition = CASE WHEN i.outcome = 'error' THEN s.condition END,
        status = CASE i.outcome WHEN 'false' THEN 'skipped'
                                WHEN 'untriggered' THEN 'skipped'
                                WHEN 'error' THEN 'error'
                                ELSE s.status END,
        completed_at = CASE WHEN i.outcome <> 'true' THEN now() END,
        last_error = CASE WHEN i.outcome = 'error'
                          THEN jsonb_build_object('kind', 'permanent', 'code', i.code,
                                                  'message', i.message)
                          ELSE s.last_error END,
        updated_at = now()
    FROM input i
    -- One primary-key probe per row (the transitions module's "Plans"): no index can
    -- serve the status test written with IS TRUE.
    WHERE s.step_id = i.step_id
      AND s.condition IS NOT NULL AND (s.status = 'pending') IS TRUE
    RETURNING s.step_id, s.task_id, i.outcome, i.message, i.code
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending',
           CASE outcome WHEN 'false' THEN 'skipped' WHEN 'untriggered' THEN 'skipped'
                        WHEN 'error' THEN 'error' ELSE 'pending' END,
           CASE outcome WHEN 'false' THEN 'condition_false'
                        WHEN 'untriggered' THEN 'trigger_not_met'
                        WHEN 'error' THEN 'failed'
                        ELSE 'condition_true' END,
           CASE WHEN outcome = 'error'
                THEN jsonb_build_object('error_code', code, 'message', message)
                ELSE '{}'::jsonb END
    FROM changed
    ORDER BY step_id
)
SELECT step_id, task_id, outcome FROM changed
