children AS (
    SELECT r.step_id, e.to_step
    FROM unnest($2::uuid[]) AS r(step_id)
    CROSS JOIN LATERAL (SELECT to_step FROM step_edges
                        WHERE from_step = r.step_id OFFSET 0) e
),
wanted AS (
    SELECT step_id FROM unnest($1::uuid[]) AS w(step_id)
    UNION
    SELECT to_step FROM children
)
