-- A create that names no version gets the newest one. The coordinator remembers which
-- that is (templates are immutable), so a create costs one statement, not a lookup and
-- then the insert. It passes how many versions the name had when it looked
-- (p_versions_known) and the statement checks that count first: templates are never
-- deleted, so an equal count means no version was registered since, here or on another
-- coordinator, and the newest it remembers is still the newest. A different count
-- raises TK001 and nothing is written; the coordinator looks again and retries. A count,
-- not the highest template id: ids are handed out before commit, so a version committed
-- after a later-numbered one would hide behind it. Otherwise the same as the function
-- it supersedes (migration 0006), which stays for coordinators of the previous release
-- until they are all restarted.
CREATE FUNCTION tasker_create_task(
    p_task_id UUID, p_template_id BIGINT, p_namespace TEXT, p_name TEXT, p_version TEXT,
    p_context JSONB, p_initiator TEXT, p_source_system TEXT, p_reason TEXT, p_tags JSONB,
    p_idempotency_key TEXT, p_trace_parent TEXT,
    p_step_ids UUID[], p_step_names TEXT[], p_handlers TEXT[], p_configs JSONB[],
    p_parents INT[], p_retry_limits INT[], p_retryable BOOLEAN[], p_timeouts_ms BIGINT[],
    p_backoff_base_ms BIGINT[], p_backoff_max_ms BIGINT[], p_backoff_jitter BOOLEAN[],
    p_backoff_schedules JSONB[], p_max_deferrals INT[],
    p_edge_from UUID[], p_edge_to UUID[],
    p_dispatch_tokens UUID[], p_lease_ms BIGINT, p_versions_known INT
) RETURNS SETOF tasks
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF p_versions_known IS NOT NULL AND p_versions_known <> (
        SELECT count(*)
        FROM templates t JOIN namespaces n USING (namespace_id)
        WHERE n.name = p_namespace AND t.name = p_name
    ) THEN
        RAISE EXCEPTION 'the versions of template %/% changed', p_namespace, p_name
            USING ERRCODE = 'TK001';
    END IF;
    RETURN QUERY
    WITH task AS (
        INSERT INTO tasks (task_id, template_id, namespace, name, version, status, context,
                           initiator, source_system, reason, tags, idempotency_key,
                           trace_parent)
        VALUES (p_task_id, p_template_id, p_namespace, p_name, p_version,
                CASE WHEN cardinality(array_remove(p_dispatch_tokens, NULL)) > 0
                     THEN 'in_progress' ELSE 'pending' END,
                p_context, p_initiator, p_source_system, p_reason, p_tags, p_idempotency_key,
                p_trace_parent)
        ON CONFLICT (namespace, name, idempotency_key) WHERE idempotency_key IS NOT NULL
        DO NOTHING
        RETURNING *
    ),
    input AS (
        SELECT s.*
        FROM unnest(p_step_ids, p_step_names, p_handlers, p_configs, p_parents, p_retry_limits,
                    p_retryable, p_timeouts_ms, p_backoff_base_ms, p_backoff_max_ms,
                    p_backoff_jitter, p_backoff_schedules, p_max_deferrals, p_dispatch_tokens)
               WITH ORDINALITY
               AS s(step_id, name, handler, config, parents, retry_limit, retryable,
                    timeout_ms, base_ms, max_ms, jitter, schedule, max_deferrals, token, n)
    ),
    new_steps AS (
        INSERT INTO steps (step_id, task_id, name, position, handler, config, status,
                           remaining_parents, attempts, retry_limit, retryable, timeout_ms,
                           backoff_base_ms, backoff_max_ms, backoff_jitter,
                           backoff_schedule_ms, max_deferrals, ready_at, dispatch_token,
                           lease_expires_at, enqueued_at)
        SELECT s.step_id, task.task_id, s.name, (s.n - 1)::INT, s.handler, s.config,
               CASE WHEN s.token IS NULL THEN 'pending' ELSE 'enqueued' END,
               s.parents, CASE WHEN s.token IS NULL THEN 0 ELSE 1 END, s.retry_limit,
               s.retryable, s.timeout_ms, s.base_ms, s.max_ms, s.jitter,
               CASE WHEN jsonb_typeof(s.schedule) = 'array'
                    THEN ARRAY(SELECT jsonb_array_elements_text(s.schedule)::BIGINT) END,
               s.max_deferrals, CASE WHEN s.parents = 0 THEN now() END, s.token,
               CASE WHEN s.token IS NOT NULL THEN now() + p_lease_ms * INTERVAL '1 millisecond' END,
               CASE WHEN s.token IS NOT NULL THEN now() END
        FROM task, input s
    ),
    step_history AS (
        INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
        SELECT s.step_id, task.task_id, 'pending', 'enqueued', 'dispatched',
               jsonb_build_object('attempt', 1, 'dispatch_token', s.token)
        FROM task, input s
        WHERE s.token IS NOT NULL
        ORDER BY s.n
    ),
    new_edges AS (
        INSERT INTO step_edges (task_id, from_step, to_step)
        SELECT task.task_id, e.from_step, e.to_step
        FROM task, unnest(p_edge_from, p_edge_to) AS e(from_step, to_step)
    ),
    task_history AS (
        INSERT INTO task_transitions (task_id, from_status, to_status, reason)
        SELECT h.task_id, h.from_status, h.to_status, h.reason
        FROM (
            SELECT task.task_id, NULL AS from_status, 'pending' AS to_status,
                   'created' AS reason, 1 AS n
            FROM task
            UNION ALL
            SELECT task.task_id, 'pending', 'in_progress', 'first_step_dispatched', 2
            FROM task WHERE task.status = 'in_progress'
        ) h
        ORDER BY h.n
    )
    SELECT * FROM task;
END $$;
