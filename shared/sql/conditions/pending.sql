-- The steps $1 that wait for their condition, with what it sees: the task's context and
-- description, and each parent's results by name (a skipped parent left out, as in a
-- step message).
SELECT s.step_id, s.task_id, s.condition, t.context, t.namespace, t.name, t.version,
       t.priority, t.tags,
       COALESCE((SELECT jsonb_object_agg(p.name, COALESCE(p.results, 'null'::jsonb))
                 FROM steps p
                 WHERE p.step_id = ANY (ARRAY(SELECT e.from_step FROM step_edges e
                                              WHERE e.to_step = s.step_id))
                   AND p.status <> 'skipped'),
                '{}'::jsonb) AS parents
FROM steps s JOIN tasks t ON t.task_id = s.task_id
WHERE s.step_id = ANY ($1) AND s.condition IS NOT NULL AND s.status = 'pending'
