-- Complete the `for_each` steps $1 whose instances are all done (an empty list: none):
-- their results are the list of their instances' results in element order (a resolved
-- instance's `null`). Each step once. Returns the steps completed, with their tasks.
WITH done AS (
    UPDATE steps s
    SET status = 'complete', condition = NULL,
        results = COALESCE((SELECT jsonb_agg(i.results ORDER BY i.item_index)
                            FROM steps i WHERE i.fan_out_of = s.step_id), '[]'::jsonb),
        completed_at = now(), updated_at = now()
    WHERE s.step_id = ANY ($1) AND (s.status = 'pending') IS TRUE AND s.instances IS NOT NULL
      AND s.remaining_parents = 0
    RETURNING s.step_id, s.task_id, s.instances
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending', 'complete', 'instances_done',
           jsonb_build_object('instances', instances)
    FROM done
    ORDER BY step_id
)
SELECT step_id, task_id FROM done
