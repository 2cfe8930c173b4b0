-- Creates arriving together are written together. Under load a coordinator gathers the
-- task creations that wait for the database into one call of tasker_create_tasks: one
-- statement, one commit and one round trip for the batch, where each task cost one of
-- each. It writes what tasker_create_task (migration 0008) writes for each task, and
-- replaces it: a creation written alone is a batch of one. (0008's function stays for
-- coordinators of the previous release until they are all restarted.)
--
-- Tasks are given in parallel arrays (p_task_ids ... p_versions_known); their steps in
-- flat arrays whose p_step_task_ids name the task each step belongs to, with its
-- position in the template; edges likewise (p_edge_task_ids). A task whose idempotency
-- key is taken (by an earlier task or by one earlier in the same batch) is skipped with
-- its steps and edges, and is missing from the returned rows.
--
-- p_versions_known holds, for a task that named no version, how many versions its
-- template's name had when the coordinator looked (NULL when it named one). If any of
-- them changed, nothing is written and TK001 is raised for the whole batch; the
-- coordinator then writes each of the batch's tasks as a batch of its own.
CREATE FUNCTION tasker_create_tasks(
    p_task_ids UUID[], p_template_ids BIGINT[], p_namespaces TEXT[], p_names TEXT[],
    p_versions TEXT[], p_contexts JSONB[], p_initiators TEXT[], p_source_systems TEXT[],
    p_reasons TEXT[], p_tags JSONB[], p_idempotency_keys TEXT[], p_trace_parents TEXT[],
    p_dispatched BOOLEAN[], p_versions_known INT[],
    p_step_task_ids UUID[], p_positions INT[], p_step_ids UUID[], p_step_names TEXT[],
    p_handlers TEXT[], p_configs JSONB[], p_parents INT[], p_retry_limits INT[],
    p_retryable BOOLEAN[], p_timeouts_ms BIGINT[], p_backoff_base_ms BIGINT[],
    p_backoff_max_ms BIGINT[], p_backoff_jitter BOOLEAN[], p_backoff_schedules JSONB[],
    p_max_deferrals INT[], p_dispatch_tokens UUID[],
    p_edge_task_ids UUID[], p_edge_from UUID[], p_edge_to UUID[],
    p_lease_ms BIGINT
) RETURNS SETOF tasks
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF EXISTS (
        SELECT 1
        FROM (SELECT DISTINCT k.namespace, k.name, k.known
              FROM unnest(p_namespaces, p_names, p_versions_known) AS k(namespace, name, known)
              WHERE k.known IS NOT NULL) k
        WHERE k.known <> (
            SELECT count(*)
            FROM templates t JOIN namespaces n USING (namespace_id)
            WHERE n.name = k.namespace AND t.name = k.name
        )
    ) THEN
        RAISE EXCEPTION 'the versions of a template changed'
            USING ERRCODE = 'TK001';
    END IF;
    RETURN QUERY
    WITH input_tasks AS (
        SELECT t.*
        FROM unnest(p_task_ids, p_template_ids, p_namespaces, p_names, p_versions, p_contexts,
                    p_initiators, p_source_systems, p_reasons, p_tags, p_idempotency_keys,
                    p_trace_parents, p_dispatched)
               WITH ORDINALITY
               AS t(task_id, template_id, namespace, name, version, context, initiator,
                    source_system, reason, tags, idempotency_key, trace_parent, dispatched, n)
    ),
    task AS (
        INSERT INTO tasks (task_id, template_id, namespace, name, version, status, context,
                           initiator, source_system, reason, tags, idempotency_key,
                           trace_parent)
        SELECT t.task_id, t.template_id, t.namespace, t.name, t.version,
               CASE WHEN t.dispatched THEN 'in_progress' ELSE 'pending' END,
               t.context, t.initiator, t.source_system, t.reason, t.tags, t.idempotency_key,
               t.trace_parent
        FROM input_tasks t
        ORDER BY t.n
        ON CONFLICT (namespace, name, idempotency_key) WHERE idempotency_key IS NOT NULL
        DO NOTHING
        RETURNING *
    ),
    input AS (
        SELECT s.*
        FROM unnest(p_step_task_ids, p_positions, p_step_ids, p_step_names, p_handlers,
                    p_configs, p_parents, p_retry_limits, p_retryable, p_timeouts_ms,
                    p_backoff_base_ms, p_backoff_max_ms, p_backoff_jitter,
                    p_backoff_schedules, p_max_deferrals, p_dispatch_tokens)
               WITH ORDINALITY
               AS s(task_id, position, step_id, name, handler, config, parents, retry_limit,
                    retryable, timeout_ms, base_ms, max_ms, jitter, schedule, max_deferrals,
                    token, n)
    ),
    new_steps AS (
        INSERT INTO steps (step_id, task_id, name, position, handler, config, status,
                           remaining_parents, attempts, retry_limit, retryable, timeout_ms,
                           backoff_base_ms, backoff_max_ms, backoff_jitter,
                           backoff_schedule_ms, max_deferrals, ready_at, dispatch_token,
                           lease_expires_at, enqueued_at)
        SELECT s.step_id, task.task_id, s.name, s.position, s.handler, s.config,
               CASE WHEN s.token IS NULL THEN 'pending' ELSE 'enqueued' END,
               s.parents, CASE WHEN s.token IS NULL THEN 0 ELSE 1 END, s.retry_limit,
               s.retryable, s.timeout_ms, s.base_ms, s.max_ms, s.jitter,
               CASE WHEN jsonb_typeof(s.schedule) = 'array'
                    THEN ARRAY(SELECT jsonb_array_elements_text(s.schedule)::BIGINT) END,
               s.max_deferrals, CASE WHEN s.parents = 0 THEN now() END, s.token,
               CASE WHEN s.token IS NOT NULL THEN now() + p_lease_ms * INTERVAL '1 millisecond' END,
               CASE WHEN s.token IS NOT NULL THEN now() END
        FROM task JOIN input s ON s.task_id = task.task_id
        ORDER BY s.n
    ),
    step_history AS (
        INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
        SELECT s.step_id, task.task_id, 'pending', 'enqueued', 'dispatched',
               jsonb_build_object('attempt', 1, 'dispatch_token', s.token)
        FROM task JOIN input s ON s.task_id = task.task_id
        WHERE s.token IS NOT NULL
        ORDER BY s.n
    ),
    new_edges AS (
        INSERT INTO step_edges (task_id, from_step, to_step)
        SELECT task.task_id, e.from_step, e.to_step
        FROM task
        JOIN unnest(p_edge_task_ids, p_edge_from, p_edge_to) AS e(task_id, from_step, to_step)
          ON e.task_id = task.task_id
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
        ORDER BY h.task_id, h.n
    )
    SELECT * FROM task;
END $$;
