-- Lock the children of the steps $1, in id order, waiting for whoever holds them. Edges
-- are followed with one index probe per step (transitions module, "Plans").
SELECT step_id
FROM steps
WHERE step_id = ANY (ARRAY(SELECT e.to_step
                           FROM unnest($1::UUID[]) AS p(step_id)
                           CROSS JOIN LATERAL (SELECT to_step FROM step_edges
                                               WHERE from_step = p.step_id OFFSET 0) e))
ORDER BY step_id
FOR UPDATE
