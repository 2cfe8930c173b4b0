-- The steps $1 failed for good: each child that runs whatever its parents' outcome
-- (`trigger: all_done`) or only after a failure (`one_failed`) counts them as finished
-- (a fan-out step does not count its own instances: their failure fails it). Returns the
-- children this made ready, to claim or judge.
WITH counted AS (
    SELECT e.to_step, count(*)::INT AS n
    FROM step_edges e
    JOIN steps f ON f.step_id = e.from_step
    WHERE e.from_step = ANY ($1) AND f.fan_out_of IS DISTINCT FROM e.to_step
    GROUP BY e.to_step
),
triggered AS (
    SELECT c.to_step, c.n
    FROM counted c
    JOIN steps s ON s.step_id = c.to_step
    JOIN tasks t ON t.task_id = s.task_id
    -- By primary key: no index can serve the status test written with IS TRUE (the
    -- transitions module's "Plans").
    WHERE (s.status = 'pending') IS TRUE
      AND tasker_step_definition(t.template_id, split_part(s.name, '[', 1)) ->> 'trigger'
          IN ('all_done', 'one_failed')
)
UPDATE steps s
SET remaining_parents = s.remaining_parents - g.n,
    ready_at = CASE WHEN s.remaining_parents = g.n THEN now() ELSE s.ready_at END,
    updated_at = now()
FROM triggered g
WHERE s.step_id = g.to_step
RETURNING s.step_id, s.remaining_parents = 0 AS ready
