-- Complete the `tasker.task` steps $1, whose children completed (or were resolved by an
-- operator), with their children's leaf results: each step of the child that no other
-- step depends on, by name (a skipped one left out; a `for_each` step with its list).
-- Each step once. Returns the steps and their tasks.
WITH done AS (
    UPDATE steps s
    SET status = 'complete', remaining_parents = 0, condition = NULL, completed_at = now(),
        updated_at = now(),
        results = COALESCE((SELECT jsonb_object_agg(c.name, COALESCE(c.results, 'null'::jsonb))
                            FROM steps c
                            WHERE c.task_id = s.child_task_id AND c.status <> 'skipped'
                              AND NOT EXISTS (SELECT 1 FROM step_edges e
                                              WHERE e.from_step = c.step_id)),
                           '{}'::jsonb)
    WHERE s.step_id = ANY ($1) AND (s.status = 'pending') IS TRUE AND s.condition IS NOT NULL
      AND s.remaining_parents = 0
    RETURNING s.step_id, s.task_id, s.child_task_id
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending', 'complete', 'child_task_done',
           jsonb_build_object('child_task_id', child_task_id)
    FROM done
    ORDER BY step_id
)
SELECT step_id, task_id FROM done
