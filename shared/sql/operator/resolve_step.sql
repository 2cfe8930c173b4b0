-- Resolve step $2 of task $1 with results $3 (it was in $4; $5 metadata), and count it
-- as done for its dependents; those that counted its failure already (`trigger:
-- all_done` or `one_failed`, resolving a step in `error`) are left as they are. An instance of a `for_each` step counts for that step,
-- which, failed by its instances (`instance_failed`), waits again for them once none is
-- left in `error`; its clean-up and compensation children, which counted its failure
-- (count_failed.sql), wait for it again if they will run again, as after a retry
-- (uncount_failed.sql).
WITH resolved AS (
    UPDATE steps
    SET status = 'resolved_manually', results = $3, lease_expires_at = NULL,
        next_attempt_at = NULL, completed_at = now(), updated_at = now()
    WHERE task_id = $1 AND name = $2
    RETURNING step_id, task_id
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, $4, 'resolved_manually', 'resolved_by_operator', $5 FROM resolved
),
counted AS (
    UPDATE steps c
    SET remaining_parents = c.remaining_parents - 1,
        ready_at = CASE WHEN c.remaining_parents = 1 THEN now() ELSE c.ready_at END,
        status = CASE WHEN v.revive THEN 'pending' ELSE c.status END,
        completed_at = CASE WHEN v.revive THEN NULL ELSE c.completed_at END
    FROM step_edges e
    JOIN resolved r ON r.step_id = e.from_step
    JOIN tasks t ON t.task_id = r.task_id
    CROSS JOIN LATERAL (
        SELECT c2.status = 'error' AND c2.last_error ->> 'code' = 'instance_failed'
               AND NOT EXISTS (SELECT 1 FROM steps o
                               WHERE o.fan_out_of = c2.step_id AND o.status = 'error'
                                 AND o.step_id <> r.step_id) AS revive
        FROM steps c2 WHERE c2.step_id = e.to_step) v
    WHERE c.step_id = e.to_step
      AND NOT ($4 = 'error'
               AND NOT EXISTS (SELECT 1 FROM steps f
                               WHERE f.step_id = r.step_id AND f.fan_out_of = c.step_id)
               AND COALESCE(tasker_step_definition(t.template_id, split_part(c.name, '[', 1))
                            ->> 'trigger'
                            IN ('all_done', 'one_failed'), false))
    RETURNING c.step_id, c.task_id, v.revive
),
recounted AS (
    UPDATE steps s
    SET remaining_parents = s.remaining_parents + 1, updated_at = now()
    FROM counted v
    JOIN step_edges e ON e.from_step = v.step_id
    JOIN tasks t ON t.task_id = v.task_id
    WHERE v.revive AND s.step_id = e.to_step
      AND s.status IN ('pending', 'error', 'cancelled')
      AND tasker_step_definition(t.template_id, split_part(s.name, '[', 1)) ->> 'trigger'
          IN ('all_done', 'one_failed')
)
INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
SELECT step_id, task_id, 'error', 'pending', 'resolved_by_operator', $5
FROM counted WHERE revive
