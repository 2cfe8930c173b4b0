-- The `for_each` steps of the instances $1 (which failed for good) fail with them, the
-- first failed instance named. Returns the steps failed.
WITH failed AS (
    SELECT DISTINCT ON (i.fan_out_of) i.fan_out_of, i.name
    FROM steps i
    WHERE i.step_id = ANY ($1) AND (i.fan_out_of IS NOT NULL) IS TRUE
    ORDER BY i.fan_out_of, i.item_index
),
changed AS (
    UPDATE steps s
    SET status = 'error', completed_at = now(), updated_at = now(),
        last_error = jsonb_build_object('kind', 'permanent', 'code', 'instance_failed',
                                        'message', 'instance `' || f.name || '` failed')
    FROM failed f
    WHERE s.step_id = f.fan_out_of AND (s.status = 'pending') IS TRUE
    RETURNING s.step_id, s.task_id, f.name
)
INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
SELECT step_id, task_id, 'pending', 'error', 'instance_failed',
       jsonb_build_object('error_code', 'instance_failed', 'instance', name)
FROM changed
ORDER BY step_id
RETURNING step_id
