-- Expand the `for_each` steps $1 into their instances: per step its list $2 (a JSON
-- array) and `max_parallel` $3 (NULL: unbounded). Each step once: a step another
-- transaction expanded is left alone. An instance is a step of the task named
-- `<step>[<index>]`, with the step's handler and settings, its element and index, edges
-- from the step's parents (its message's parents) and to the step, whose parents still
-- to finish are now its instances. `max_parallel` is the instances' concurrency key
-- (`fan_out:<step id>`), which the claim counts like any other; created_at follows the
-- element order, which is the order instances are claimed in. The instances of a first
-- step are first steps too: like it, they wait for their template's concurrency. Returns the instances,
-- in element order (a step with an empty list has none: its caller completes it).
WITH input AS (
    SELECT i.step_id, i.items, i.max_parallel
    FROM unnest($1::UUID[], $2::JSONB[], $3::INT[]) AS i(step_id, items, max_parallel)
),
expanded AS (
    UPDATE steps s
    SET instances = jsonb_array_length(i.items),
        remaining_parents = jsonb_array_length(i.items),
        updated_at = now()
    FROM input i
    -- One primary-key probe per row (the transitions module's "Plans"): no index can
    -- serve the status test written with IS TRUE.
    WHERE s.step_id = i.step_id
      AND (s.status = 'pending') IS TRUE AND s.condition IS NOT NULL AND s.instances IS NULL
    RETURNING s.step_id, s.task_id, s.name, s.position, s.handler, s.config, s.retry_limit,
              s.retryable, s.timeout_ms, s.backoff_base_ms, s.backoff_max_ms,
              s.backoff_jitter, s.backoff_schedule_ms, s.max_deferrals, s.priority,
              s.rate_key, s.rate_limit, s.rate_window_ms, s.concurrency_key,
              s.concurrency_limit, s.task_limited, i.items, i.max_parallel
),
created AS (
    INSERT INTO steps (step_id, task_id, name, position, handler, config, status,
                       remaining_parents, retry_limit, retryable, timeout_ms,
                       backoff_base_ms, backoff_max_ms, backoff_jitter, backoff_schedule_ms,
                       max_deferrals, priority, rate_key, rate_limit, rate_window_ms,
                       concurrency_key, concurrency_limit, task_limited, ready_at, created_at,
                       fan_out_of, item, item_index)
    SELECT gen_random_uuid(), x.task_id, x.name || '[' || (e.n - 1) || ']', x.position,
           x.handler, x.config, 'pending', 0, x.retry_limit, x.retryable, x.timeout_ms,
           x.backoff_base_ms, x.backoff_max_ms, x.backoff_jitter, x.backoff_schedule_ms,
           x.max_deferrals, x.priority, x.rate_key, x.rate_limit, x.rate_window_ms,
           CASE WHEN x.max_parallel IS NULL THEN x.concurrency_key
                ELSE 'fan_out:' || x.step_id END,
           COALESCE(x.max_parallel, x.concurrency_limit), x.task_limited,
           now(), now() + (e.n - 1) * INTERVAL '1 microsecond', x.step_id, e.item,
           (e.n - 1)::INT
    FROM expanded x
    CROSS JOIN LATERAL jsonb_array_elements(x.items) WITH ORDINALITY AS e(item, n)
    RETURNING step_id, task_id, fan_out_of, item_index
),
parent_edges AS (
    INSERT INTO step_edges (task_id, from_step, to_step)
    SELECT c.task_id, e.from_step, c.step_id
    FROM created c JOIN step_edges e ON e.to_step = c.fan_out_of
),
fan_in_edges AS (
    INSERT INTO step_edges (task_id, from_step, to_step)
    SELECT task_id, step_id, fan_out_of FROM created
),
history AS (
    INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
    SELECT step_id, task_id, 'pending', 'pending', 'fanned_out',
           jsonb_build_object('instances', jsonb_array_length(items))
    FROM expanded
    ORDER BY step_id
)
SELECT step_id FROM created ORDER BY fan_out_of, item_index
