-- The steps $1 that wait for their condition, with what it sees: the task's context and
-- description, and each parent's results by name (a skipped parent left out, as in a
-- step message); for a `for_each` step, its list and `max_parallel` from the template,
-- and how many instances it has (NULL until expanded; then its parents are its
-- instances, which the fan-in reads itself); its handler and config (`tasker.wait`);
-- its `trigger` and whether a parent ended in `error`; for a `tasker.task` step, what a
-- child inherits (trace, deadline), its task's depth below its root and that root, its
-- child (once started) and the child's status, and its attempts.
SELECT s.step_id, s.task_id, s.name AS step_name, s.condition, t.context, t.namespace,
       t.name, t.version, t.priority, t.tags, t.trace_parent, t.deadline_at, t.depth,
       COALESCE(t.root_task_id, t.task_id) AS root_task_id, s.handler,
       s.config, s.instances, s.child_task_id,
       (SELECT c.status FROM tasks c WHERE c.task_id = s.child_task_id) AS child_status,
       s.attempts, s.retry_limit, s.retryable,
       d.step ->> 'for_each' AS for_each, d.step ->> 'trigger' AS trigger,
       EXISTS (SELECT 1 FROM step_edges e JOIN steps p ON p.step_id = e.from_step
               WHERE e.to_step = s.step_id AND p.status = 'error') AS parent_failed,
       (d.step ->> 'max_parallel')::INT AS max_parallel,
       CASE WHEN s.instances IS NULL THEN
           COALESCE((SELECT jsonb_object_agg(p.name, COALESCE(p.results, 'null'::jsonb))
                     FROM steps p
                     WHERE p.step_id = ANY (ARRAY(SELECT e.from_step FROM step_edges e
                                                  WHERE e.to_step = s.step_id))
                       AND p.status <> 'skipped'),
                    '{}'::jsonb)
       END AS parents
FROM steps s JOIN tasks t ON t.task_id = s.task_id
CROSS JOIN LATERAL (SELECT tasker_step_definition(t.template_id, s.name) AS step) d
WHERE s.step_id = ANY ($1) AND s.condition IS NOT NULL AND (s.status = 'pending') IS TRUE
