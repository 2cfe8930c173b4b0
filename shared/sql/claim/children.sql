-- The children of the completed steps $1, each with how many of its parents are among
-- them, counted and claimed where that was the last (lease of $2 ms), and the held steps
-- of the concurrency keys $3 whose steps finished; $4 false when no template of these
-- steps has limits (the claim then need not look for keys). Edges are followed with one
-- index probe per step (transitions module, "Plans").
WITH done AS MATERIALIZED (
    SELECT e.to_step, count(*)::INT AS parents
    FROM unnest($1::UUID[]) AS u(step_id)
    CROSS JOIN LATERAL (SELECT to_step FROM step_edges
                        WHERE from_step = u.step_id OFFSET 0) e
    GROUP BY e.to_step
)
SELECT *
FROM tasker_claim_steps(ARRAY(SELECT to_step FROM done ORDER BY to_step),
                        ARRAY(SELECT parents FROM done ORDER BY to_step),
                        $2,
                        $3::TEXT[],
                        $4::BOOLEAN)
