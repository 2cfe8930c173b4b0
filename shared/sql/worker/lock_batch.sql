-- Lock, without waiting, the steps $1 and the children of the results $2; answer those
-- of $1 (or a child of theirs) that another transaction holds, with their status.
WITH {BATCH_ROWS},
locked AS MATERIALIZED (
    SELECT step_id FROM steps
    WHERE step_id = ANY (ARRAY(SELECT step_id FROM wanted))
    ORDER BY step_id
    FOR UPDATE SKIP LOCKED
),
held AS (
    -- Rows that exist but were skipped: another transaction holds them.
    SELECT step_id FROM steps
    WHERE step_id = ANY (ARRAY(SELECT step_id FROM wanted
                               EXCEPT SELECT step_id FROM locked))
)
SELECT s.step_id, s.status
FROM steps s
WHERE s.step_id = ANY (ARRAY(
    SELECT step_id FROM unnest($1::uuid[]) AS w(step_id)
    WHERE step_id IN (SELECT step_id FROM held)
    UNION
    SELECT step_id FROM children WHERE to_step IN (SELECT step_id FROM held)))
