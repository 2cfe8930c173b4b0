-- Before an operator's retry of task $1 sends its failed steps back to `pending`: each
-- child that counted such a step as finished (`trigger: all_done` or `one_failed`, see
-- count_failed.sql) and will run again (`pending`, `error`, or `cancelled` by the task's
-- deadline, which the retry reopens: a task in error has no other cancelled steps)
-- waits for it once more. An instance of a `for_each` step has that step's trigger.
WITH counted AS (
    SELECT e.to_step, count(*)::INT AS n
    FROM steps f
    JOIN step_edges e ON e.from_step = f.step_id
    WHERE f.task_id = $1 AND f.status = 'error' AND f.fan_out_of IS DISTINCT FROM e.to_step
    GROUP BY e.to_step
)
UPDATE steps s
SET remaining_parents = s.remaining_parents + c.n, updated_at = now()
FROM counted c, tasks t
WHERE s.step_id = c.to_step AND t.task_id = s.task_id
  AND s.status IN ('pending', 'error', 'cancelled')
  AND tasker_step_definition(t.template_id, split_part(s.name, '[', 1)) ->> 'trigger'
      IN ('all_done', 'one_failed')
