-- Complete the `for_each` steps $1 whose instances are all done (an empty list: none):
-- their results are the list of their instances' results in element order (a resolved
-- instance's `null`), when that list is at most the connection's
-- `tasker.max_gathered_bytes` of JSON. Each step once. Returns the steps completed, with
-- their tasks, then (task NULL) the steps whose list would be larger, with its size and
-- the limit: left as they are, for the caller to fail.
WITH max AS (
    -- The connection's `tasker.max_gathered_bytes` (the coordinator's
    -- TASKER_MAX_STEP_MESSAGE_BYTES), 16 MiB where it is not set.
    SELECT COALESCE(NULLIF(current_setting('tasker.max_gathered_bytes', true), '')::bigint,
                    16777216) AS bytes
),
sized AS (
    SELECT s.step_id,
           (SELECT COALESCE(sum(octet_length(COALESCE(i.results, 'null'::jsonb)::text) + 1), 1)
            FROM steps i WHERE i.fan_out_of = s.step_id) AS size
    FROM steps s
    WHERE s.step_id = ANY ($1) AND (s.status = 'pending') IS TRUE AND s.instances IS NOT NULL
      AND s.remaining_parents = 0
),
done AS (
    UPDATE steps s
    SET status = 'complete', condition = NULL,
        results = COALESCE((SELECT jsonb_agg(i.results ORDER BY i.item_index)
                            FROM steps i WHERE i.fan_out_of = s.step_id), '[]'::jsonb),
        completed_at = now(), updated_at = now()
    FROM sized z
    WHERE s.step_id = z.step_id AND z.size <= (SELECT bytes FROM max)
      AND (s.status = 'pending') IS TRUE AND s.instances IS NOT NULL
      AND s.remaining_parents = 0
    RETURNING s.step_id, s.task_id, s.instances
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending', 'complete', 'instances_done',
           jsonb_build_object('instances', instances)
    FROM done
    ORDER BY step_id
)
SELECT step_id, task_id, NULL::bigint AS size, NULL::bigint AS max FROM done
UNION ALL
SELECT step_id, NULL, size, (SELECT bytes FROM max) FROM sized
WHERE size > (SELECT bytes FROM max)
