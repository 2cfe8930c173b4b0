-- Complete the `tasker.task` steps $1, whose children completed (or were resolved by an
-- operator), with their children's leaf results: each step of the child that no other
-- step depends on, by name (a skipped one left out; a `for_each` step with its list),
-- when those are at most the connection's `tasker.max_gathered_bytes` of JSON together.
-- Each step once. Returns the steps completed, with their tasks, then (task NULL) the
-- steps whose leaf results would be larger, with their size and the limit: left as they
-- are, for the caller to fail.
WITH max AS (
    -- The connection's `tasker.max_gathered_bytes` (the coordinator's
    -- TASKER_MAX_STEP_MESSAGE_BYTES), 16 MiB where it is not set.
    SELECT COALESCE(NULLIF(current_setting('tasker.max_gathered_bytes', true), '')::bigint,
                    16777216) AS bytes
),
sized AS (
    SELECT s.step_id,
           (SELECT COALESCE(sum(octet_length(COALESCE(c.results, 'null'::jsonb)::text)
                                + octet_length(c.name) + 4), 2)
            FROM steps c
            WHERE c.task_id = s.child_task_id AND c.status <> 'skipped'
              AND NOT EXISTS (SELECT 1 FROM step_edges e WHERE e.from_step = c.step_id))
               AS size
    FROM steps s
    WHERE s.step_id = ANY ($1) AND (s.status = 'pending') IS TRUE AND s.condition IS NOT NULL
      AND s.remaining_parents = 0
),
done AS (
    UPDATE steps s
    SET status = 'complete', remaining_parents = 0, condition = NULL, completed_at = now(),
        updated_at = now(),
        results = COALESCE((SELECT jsonb_object_agg(c.name, COALESCE(c.results, 'null'::jsonb))
                            FROM steps c
                            WHERE c.task_id = s.child_task_id AND c.status <> 'skipped'
                              AND NOT EXISTS (SELECT 1 FROM step_edges e
                                              WHERE e.from_step = c.step_id)),
                           '{}'::jsonb)
    FROM sized z
    WHERE s.step_id = z.step_id AND z.size <= (SELECT bytes FROM max)
      AND (s.status = 'pending') IS TRUE AND s.condition IS NOT NULL
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
SELECT step_id, task_id, NULL::bigint AS size, NULL::bigint AS max FROM done
UNION ALL
SELECT step_id, NULL, size, (SELECT bytes FROM max) FROM sized
WHERE size > (SELECT bytes FROM max)
