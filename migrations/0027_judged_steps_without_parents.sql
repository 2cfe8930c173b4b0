-- The claim of migration 0026, but a step it hands over to be judged (a `when`, a
-- `for_each` step whose instances are done) comes without its parents' results, as in
-- the claim's keyed forms: the judge reads what it needs itself. The results of a
-- fan-out's instances were gathered here into one jsonb object, and instances whose
-- results together passed jsonb's 256 MiB made PostgreSQL refuse the claim, and with it
-- the result of the last instance, for ever.
CREATE OR REPLACE FUNCTION tasker_claim_steps(
    p_step_ids UUID[], p_parents_done INT[], p_lease_ms BIGINT, p_release_keys TEXT[],
    p_keyed BOOLEAN DEFAULT NULL
)
RETURNS TABLE (
    step_id UUID,
    task_id UUID,
    name TEXT,
    handler TEXT,
    config JSONB,
    attempts INT,
    retry_limit INT,
    deferrals INT,
    dispatch_token UUID,
    timeout_ms BIGINT,
    namespace TEXT,
    template TEXT,
    context JSONB,
    parents JSONB,
    dispatched_at TIMESTAMPTZ,
    trace_parent TEXT
)
LANGUAGE plpgsql
-- One plan per connection that is index probes at every table size (migration 0011).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
#variable_conflict use_column
DECLARE
    v_locks BIGINT[];
    v_ids UUID[] := COALESCE(p_step_ids, '{}');
    v_now TIMESTAMPTZ;
    v_starts_limited BOOLEAN;
    v_task_locks BIGINT[];
BEGIN
    -- Two claims of one key run one after the other, fleet-wide: each takes its keys'
    -- transaction locks, in one order, before it counts. The counting statements below
    -- start after the lock is granted, so they see what the previous holder committed.
    --
    -- The keys: one pass over the candidates by primary key (OFFSET 0 keeps it the
    -- driving scan: a plan kept for this function once walked every task for the
    -- template concurrency's keys, at every claim), unless the caller says none of them
    -- has one.
    v_starts_limited := false;
    IF p_keyed IS DISTINCT FROM false THEN
        SELECT array_agg(DISTINCT hashtextextended(k.key, 0)
                         ORDER BY hashtextextended(k.key, 0)) FILTER (WHERE k.key IS NOT NULL),
               COALESCE(bool_or(s.task_limited), false)
        INTO v_locks, v_starts_limited
        FROM (SELECT s.task_limited,
                     ARRAY['tasker concurrency ' || s.concurrency_key, 'tasker rate ' || s.rate_key]
                     || CASE WHEN s.task_limited THEN
                            ARRAY(SELECT 'tasker task ' || tk.key
                                  FROM unnest((SELECT t.concurrency_keys FROM tasks t
                                               WHERE t.task_id = s.task_id
                                                 AND (t.status = 'pending') IS TRUE)) AS tk(key))
                        END AS keys
              FROM steps s
              WHERE s.step_id = ANY (v_ids)
              OFFSET 0) s
        CROSS JOIN LATERAL unnest(s.keys) AS k(key);
    END IF;
    IF cardinality(p_release_keys) > 0 THEN
        -- With each released key, the rate keys of the held steps it will offer (read
        -- before any lock: the few offered otherwise are locked after the others).
        v_locks := ARRAY(SELECT DISTINCT l FROM unnest(v_locks || ARRAY(
                             SELECT hashtextextended('tasker concurrency ' || r.key, 0)
                             FROM unnest(p_release_keys) AS r(key)) || ARRAY(
                             SELECT hashtextextended('tasker rate ' || h.rate_key, 0)
                             FROM unnest(p_release_keys) AS r(key)
                             CROSS JOIN LATERAL (
                                 SELECT s.rate_key
                                 FROM steps s
                                 WHERE s.held = 'concurrency_limited' AND s.held_task_key IS NULL
                                   AND s.status IN ('pending', 'waiting_for_retry')
                                   AND s.concurrency_key = r.key
                                 ORDER BY s.priority DESC, s.created_at
                                 LIMIT (SELECT f.concurrency_limit FROM steps f
                                        WHERE f.held = 'concurrency_limited'
                                          AND f.held_task_key IS NULL
                                          AND f.status IN ('pending', 'waiting_for_retry')
                                          AND f.concurrency_key = r.key
                                        ORDER BY f.priority DESC, f.created_at
                                        LIMIT 1)) h
                             WHERE h.rate_key IS NOT NULL)) AS l
                         WHERE l IS NOT NULL ORDER BY l);
    END IF;
    -- One statement takes them all, in the array's (sorted) order: a statement per
    -- lock cost more than the claim itself in a batch of a hundred keys.
    IF v_locks IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(l.lock) FROM unnest(v_locks) AS l(lock);
    END IF;

    -- The held steps of the released keys, as many per key as its limit, are offered
    -- too. Rows another transaction holds are left to it.
    IF cardinality(p_release_keys) > 0 THEN
        v_ids := v_ids || ARRAY(
            SELECT h.step_id
            FROM unnest(p_release_keys) AS r(key)
            CROSS JOIN LATERAL (
                SELECT s.step_id
                FROM steps s
                WHERE s.held = 'concurrency_limited' AND s.held_task_key IS NULL
                  AND s.status IN ('pending', 'waiting_for_retry')
                  AND s.concurrency_key = r.key
                  AND s.step_id <> ALL (v_ids)
                ORDER BY s.priority DESC, s.created_at
                LIMIT (SELECT f.concurrency_limit FROM steps f
                       WHERE f.held = 'concurrency_limited' AND f.held_task_key IS NULL
                         AND f.status IN ('pending', 'waiting_for_retry')
                         AND f.concurrency_key = r.key
                       ORDER BY f.priority DESC, f.created_at
                       LIMIT 1)
                FOR UPDATE SKIP LOCKED) h);
        -- A released step's rate key is counted below (taken above, unless the step was
        -- not among those held when the keys were read), and it may be the first of a
        -- task its template limits: those keys are taken too, after the others, so two
        -- such claims may deadlock, and PostgreSQL ends one (only a first step under both
        -- kinds of concurrency, or a step held since the keys were read, can).
        SELECT array_agg(DISTINCT hashtextextended('tasker task ' || tk.key, 0))
        INTO v_task_locks
        FROM steps s
        CROSS JOIN LATERAL unnest((SELECT t.concurrency_keys FROM tasks t
                                   WHERE t.task_id = s.task_id
                                     AND (t.status = 'pending') IS TRUE)) AS tk(key)
        WHERE s.step_id = ANY (v_ids) AND s.task_limited;
        IF v_task_locks IS NOT NULL THEN
            v_starts_limited := true;
        END IF;
        v_task_locks := ARRAY(
            SELECT DISTINCT l
            FROM unnest(v_task_locks || ARRAY(
                     SELECT hashtextextended('tasker rate ' || s.rate_key, 0)
                     FROM steps s
                     WHERE s.step_id = ANY (v_ids) AND s.rate_key IS NOT NULL)) AS l
            WHERE l IS NOT NULL AND l <> ALL (COALESCE(v_locks, '{}'))
            ORDER BY l);
        IF cardinality(v_task_locks) > 0 THEN
            PERFORM pg_advisory_xact_lock(l.lock) FROM unnest(v_task_locks) AS l(lock);
        END IF;
    END IF;

    -- Without a key among the candidates (no limit to count, no lock taken), the claim is
    -- the rule alone: the limits' ranking and counting would cost every claim of a
    -- template without limits (0.26 against 0.37 ms for a claim of five, pgbench).
    IF v_locks IS NULL THEN
        RETURN QUERY
        WITH input AS (
            SELECT i.step_id, COALESCE(i.done, 0) AS done
            FROM unnest(v_ids, p_parents_done) AS i(step_id, done)
            WHERE i.step_id IS NOT NULL
        ),
        current AS (
            -- One primary-key probe per input row: the caller holds these rows.
            SELECT s.step_id, s.status AS from_status, i.done,
                   s.remaining_parents - i.done AS remaining,
                   tasker_step_claimable(s.status, s.remaining_parents - i.done,
                                         s.next_attempt_at, s.attempts, s.retry_limit)
                   AND (p_keyed IS NULL
                        OR s.concurrency_key IS NULL AND s.rate_key IS NULL
                           AND NOT s.task_limited)
                   AND s.condition IS NULL AS claim,
                   -- Ready but for its condition: the caller evaluates it.
                   s.condition IS NOT NULL
                   AND tasker_step_claimable(s.status, s.remaining_parents - i.done,
                                             s.next_attempt_at, s.attempts, s.retry_limit)
                   AND (p_keyed IS NULL OR NOT s.task_limited) AS judge
            FROM input i
            CROSS JOIN LATERAL (SELECT * FROM steps o WHERE o.step_id = i.step_id OFFSET 0) s
        ),
        changed AS (
            UPDATE steps s
            SET remaining_parents = c.remaining,
                ready_at = CASE WHEN c.done > 0 AND c.remaining = 0 THEN now() ELSE s.ready_at END,
                status = CASE WHEN c.claim THEN 'enqueued' ELSE s.status END,
                attempts = s.attempts + CASE WHEN c.claim THEN 1 ELSE 0 END,
                dispatch_token = CASE WHEN c.claim THEN gen_random_uuid() ELSE s.dispatch_token END,
                lease_expires_at = CASE WHEN c.claim
                                        THEN now() + p_lease_ms * INTERVAL '1 millisecond'
                                        ELSE s.lease_expires_at END,
                next_attempt_at = CASE WHEN c.claim THEN NULL ELSE s.next_attempt_at END,
                held = CASE WHEN c.claim THEN NULL ELSE s.held END,
                held_task_key = CASE WHEN c.claim THEN NULL ELSE s.held_task_key END,
                enqueued_at = CASE WHEN c.claim THEN now() ELSE s.enqueued_at END,
                updated_at = CASE WHEN c.claim THEN now() ELSE s.updated_at END
            FROM current c
            -- A step to judge passes through too (unchanged): `current` is read once,
            -- which keeps it inlined into this statement.
            WHERE s.step_id = c.step_id AND (c.claim OR c.done > 0 OR c.judge)
            RETURNING s.step_id, s.task_id, s.name, s.handler, s.config, s.attempts,
                      s.retry_limit, s.deferrals, s.dispatch_token, s.timeout_ms,
                      c.from_status, c.claim, c.judge
        ),
        claimed AS (
            SELECT * FROM changed WHERE claim
        ),
        step_history AS (
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, from_status, 'enqueued', 'dispatched',
                   jsonb_build_object('attempt', attempts, 'dispatch_token', dispatch_token)
            FROM claimed
            ORDER BY step_id
        ),
        started_tasks AS (
            -- As in the forms below: a task starts when a first step is claimed or handed
            -- to the caller to be judged (a condition, a wait, a child task, a fan-out).
            UPDATE tasks t SET status = 'in_progress', updated_at = now()
            WHERE t.task_id = ANY (ARRAY(
                      SELECT k.task_id FROM tasks k
                      WHERE k.task_id = ANY (ARRAY(SELECT task_id FROM changed
                                                   WHERE claim OR judge))
                        AND (k.status = 'pending') IS TRUE
                      ORDER BY k.task_id
                      FOR UPDATE))
              AND (t.status = 'pending') IS TRUE
            RETURNING t.task_id
        ),
        task_history AS (
            INSERT INTO task_transitions (task_id, from_status, to_status, reason)
            SELECT task_id, 'pending', 'in_progress', 'first_step_dispatched'
            FROM started_tasks
            ORDER BY task_id
        )
        -- A step to judge is named only (the judge reads what it needs): its parents'
        -- results are not gathered here, where a fan-out's, past what one jsonb value
        -- holds, would refuse the whole claim.
        SELECT c.step_id, c.task_id, c.name, c.handler, c.config, c.attempts, c.retry_limit,
               c.deferrals, CASE WHEN c.claim THEN c.dispatch_token END, c.timeout_ms, t.namespace,
               t.name || '@' || t.version, t.context,
               CASE WHEN c.claim THEN
                   COALESCE((SELECT jsonb_object_agg(p.name, COALESCE(p.results, 'null'::jsonb))
                             FROM steps p
                             WHERE p.step_id = ANY (ARRAY(SELECT e.from_step FROM step_edges e
                                                          WHERE e.to_step = c.step_id))
                               AND p.status <> 'skipped'),
                            '{}'::jsonb)
               END,
               now(), t.trace_parent
        -- A step whose condition is to be judged comes without a dispatch token.
        FROM changed c JOIN tasks t ON t.task_id = c.task_id
        WHERE c.claim OR c.judge;
        RETURN;
    END IF;

    -- Rate windows count in wall-clock time from here, after the locks: now() is when
    -- the transaction began, which for a batch of results (or a claim that waited for a
    -- key) is earlier than the claim.
    v_now := clock_timestamp();

    -- With keys, two forms of the one claim: with the template concurrency's decisions
    -- (when a candidate would start a task of such a template) and without. They differ only by
    -- those parts; each data-modifying part costs its table's and indexes' opening at
    -- every claim, whether it writes or not (0.33 against 0.44-0.67 ms for a claim of
    -- five, measured with pgbench), so a claim that cannot start such a task leaves them
    -- out.
    IF v_starts_limited THEN
        RETURN QUERY
        WITH input AS (
            SELECT i.step_id, COALESCE(i.done, 0) AS done
            FROM unnest(v_ids, p_parents_done) AS i(step_id, done)
            WHERE i.step_id IS NOT NULL
        ),
        current AS (
            -- One primary-key probe per input row: the caller holds these rows.
            SELECT s.step_id, s.status AS from_status, i.done,
                   s.remaining_parents - i.done AS remaining,
                   tasker_step_claimable(s.status, s.remaining_parents - i.done,
                                         s.next_attempt_at, s.attempts, s.retry_limit)
                   AND s.condition IS NULL AS claimable,
                   -- Ready but for its condition: the caller evaluates it.
                   s.condition IS NOT NULL
                   AND tasker_step_claimable(s.status, s.remaining_parents - i.done,
                                             s.next_attempt_at, s.attempts, s.retry_limit)
                       AS judge,
                   s.name AS step_name,
                   s.held AS was_held, s.held_task_key AS was_task_key, s.priority, s.created_at,
                   s.task_id, s.task_limited, s.concurrency_key, s.concurrency_limit,
                   s.rate_key, s.rate_limit, s.rate_window_ms
            FROM input i
            CROSS JOIN LATERAL (SELECT * FROM steps o WHERE o.step_id = i.step_id OFFSET 0) s
        ),
        starting AS (
            -- The first steps, to claim or to judge, of tasks not yet started whose template
            -- limits its tasks (a task whose first step waits for a signal, runs a child
            -- task or fans out runs from then on): per step and limit, the task's rank
            -- among those starting with the key (best first) and how many tasks of the
            -- key run.
            SELECT st.*,
                   dense_rank() OVER (PARTITION BY st.key
                                      ORDER BY st.priority DESC, st.created_at, st.task_id) AS rank,
                   (SELECT count(*) FROM task_slots r
                    WHERE r.key = st.key
                      AND (SELECT t.status FROM tasks t WHERE t.task_id = r.task_id)
                          = 'in_progress')::INT AS running
            FROM (SELECT c.step_id, c.task_id, t.priority, t.created_at, e.key, e.lim, e.on_limit
                  FROM current c
                  CROSS JOIN LATERAL (SELECT k.* FROM tasks k
                                      WHERE k.task_id = c.task_id
                                        AND (k.status = 'pending') IS TRUE
                                      OFFSET 0) t
                  CROSS JOIN LATERAL unnest(t.concurrency_keys, t.concurrency_limits,
                                            t.concurrency_on_limit) AS e(key, lim, on_limit)
                  WHERE (c.claimable OR c.judge) AND c.task_limited) st
        ),
        task_limits AS (
            -- Per such step: its task is cancelled (cancel_newest past the limit, or
            -- cancel_oldest past what cancelling every running task frees), or waits for a
            -- key (queue), or starts.
            SELECT s.step_id, s.task_id,
                   bool_or(s.rank > s.lim - s.running AND s.on_limit = 'cancel_newest'
                           OR s.rank > s.lim AND s.on_limit = 'cancel_oldest') AS cancel,
                   min(s.key) FILTER (WHERE s.rank > s.lim - s.running AND s.on_limit = 'queue')
                       AS waits_for
            FROM starting s
            GROUP BY s.step_id, s.task_id
        ),
        gated AS (
            -- Each candidate with what its task's start decided (the template's
            -- concurrency), and whether its own limits are to be counted: claimable, its
            -- task not held back, with a concurrency or rate key. The rest take the rule
            -- alone. Computed over the candidates in one pass (window functions), never by
            -- joining them to per-key sets: without hash joins (this function's settings)
            -- such a join is a nested loop, quadratic in a batch.
            SELECT c.*, COALESCE(t.cancel, false) AS cancel, t.waits_for,
                   c.claimable AND NOT COALESCE(t.cancel, false) AND t.waits_for IS NULL
                       AND (c.concurrency_key IS NOT NULL OR c.rate_key IS NOT NULL) AS limited
            FROM current c
            LEFT JOIN task_limits t ON t.step_id = c.step_id
        ),
        ranked AS (
            -- Per concurrency key: the rank (best first) and how many are queued or running.
            SELECT g.*,
                   row_number() OVER (PARTITION BY g.limited, g.concurrency_key
                                      ORDER BY g.priority DESC, g.created_at, g.step_id) AS rank,
                   CASE WHEN g.limited AND g.concurrency_key IS NOT NULL THEN
                       (SELECT count(*) FROM steps r
                        WHERE r.concurrency_key = g.concurrency_key
                          AND r.status IN ('enqueued', 'in_progress'))::INT
                   END AS running
            FROM gated g
        ),
        fitting AS (
            SELECT r.*,
                   NOT r.limited OR r.concurrency_key IS NULL
                       OR r.rank <= r.concurrency_limit - r.running AS fits
            FROM ranked r
        ),
        rated AS (
            -- Per rate key, among those that fit: the rank, the key's starts within the
            -- window (oldest first) and how many were claimed and have not started.
            SELECT f.*,
                   row_number() OVER (PARTITION BY f.limited AND f.fits, f.rate_key
                                      ORDER BY f.priority DESC, f.created_at, f.step_id) AS rate_rank,
                   CASE WHEN f.limited AND f.fits AND f.rate_key IS NOT NULL THEN
                       ARRAY(SELECT x.started_at FROM steps t
                             -- A start a coordinator older than this function wrote
                             -- (during a rolling upgrade) is in started_at alone.
                             CROSS JOIN LATERAL unnest(COALESCE(
                                 t.rate_starts,
                                 CASE WHEN t.status <> 'enqueued' THEN ARRAY[t.started_at] END))
                                 AS x(started_at)
                             WHERE t.rate_key = f.rate_key
                               AND t.started_at > v_now - f.rate_window_ms * INTERVAL '1 millisecond'
                               AND x.started_at > v_now - f.rate_window_ms * INTERVAL '1 millisecond'
                             ORDER BY x.started_at)
                   END AS starts,
                   CASE WHEN f.limited AND f.fits AND f.rate_key IS NOT NULL THEN
                       (SELECT count(*) FROM steps t
                        WHERE t.rate_key = f.rate_key AND t.status = 'enqueued')::INT
                   END AS pending
            FROM fitting f
        ),
        decided AS (
            -- Claim, or hold (and for a rate, until when). A step of a task cancelled here is
            -- left to the cancel below, as it was.
            SELECT r.step_id, r.from_status, r.done, r.remaining, r.claimable, r.was_held,
                   r.was_task_key,
                   r.claimable AND NOT r.cancel AND r.waits_for IS NULL AND r.fits
                       AND NOT r.rate_held AS claim,
                   CASE WHEN NOT (r.claimable OR r.judge) OR r.cancel THEN r.was_held
                        WHEN r.waits_for IS NOT NULL OR NOT r.fits THEN 'concurrency_limited'
                        WHEN r.rate_held THEN 'rate_limited'
                   END AS held,
                   CASE WHEN NOT (r.claimable OR r.judge) OR r.cancel THEN r.was_task_key
                        ELSE r.waits_for
                   END AS held_task_key,
                   -- A rate-held step's slot: when enough starts have left the window. Once
                   -- the claims of this statement are made, the window holds `used` starts
                   -- and the free slots' claims (at least the limit); the held step of rank
                   -- `rate_rank` needs `used + rate_rank - limit` of them gone. Those known are
                   -- the starts, oldest first; the rest start from now on, so at best a
                   -- window from now (checked again then).
                   CASE WHEN r.rate_held THEN
                       CASE WHEN r.used + r.rate_rank - r.rate_limit <= cardinality(r.starts)
                            THEN r.starts[(r.used + r.rate_rank - r.rate_limit)::INT]
                            ELSE v_now
                       END
                       + r.rate_window_ms * INTERVAL '1 millisecond'
                         * (1 + GREATEST(r.used + r.rate_rank - r.rate_limit
                                         - cardinality(r.starts) - 1, 0)
                                / GREATEST(r.rate_limit, 1))
                   END AS next_slot
            FROM (SELECT r.*,
                         COALESCE(cardinality(r.starts), 0) + COALESCE(r.pending, 0) AS used,
                         r.limited AND r.fits AND r.rate_key IS NOT NULL
                             AND r.rate_rank > r.rate_limit - (COALESCE(cardinality(r.starts), 0)
                                                               + COALESCE(r.pending, 0))
                             AS rate_held
                  FROM rated r) r
        ),
        victims AS (
            -- cancel_oldest: each key's oldest running tasks, as many as the tasks that do
            -- start here (a step claimed or to judge; one held by its own limits starts
            -- nothing) past its limit. A running task with a candidate here is one too:
            -- its candidates are then neither claimed nor judged, and are cancelled with it.
            SELECT v.task_id
            FROM (SELECT s.key, count(DISTINCT s.task_id) - max(s.lim - s.running) AS over
                  FROM starting s
                  JOIN current c ON c.step_id = s.step_id
                  JOIN task_limits t ON t.step_id = s.step_id
                  JOIN decided d ON d.step_id = s.step_id
                  WHERE s.on_limit = 'cancel_oldest' AND NOT t.cancel AND t.waits_for IS NULL
                    AND (d.claim OR c.judge)
                  GROUP BY s.key) o
            CROSS JOIN LATERAL (SELECT r.task_id FROM task_slots r
                                CROSS JOIN LATERAL (SELECT t.status, t.created_at FROM tasks t
                                                    WHERE t.task_id = r.task_id OFFSET 0) t
                                WHERE r.key = o.key AND (t.status = 'in_progress') IS TRUE
                                ORDER BY t.created_at
                                LIMIT GREATEST(o.over, 0)) v
        ),
        to_cancel AS (
            SELECT DISTINCT t.task_id, 'pending' AS from_status FROM task_limits t WHERE t.cancel
            UNION
            SELECT v.task_id, 'in_progress' FROM victims v
        ),
        cancelled_tasks AS (
            -- By primary key only, the status tested where no index can serve it (`IS
            -- TRUE`): offered `status IN (...)`, the plan kept for this function read every
            -- unfinished task at every claim.
            UPDATE tasks t SET status = 'cancelled', completed_at = now(), updated_at = now()
            WHERE t.task_id = ANY (ARRAY(SELECT task_id FROM to_cancel))
              AND (t.status IN ('pending', 'in_progress')) IS TRUE
            RETURNING t.task_id
        ),
        cancelled_task_history AS (
            INSERT INTO task_transitions (task_id, from_status, to_status, reason)
            SELECT c.task_id, x.from_status, 'cancelled', 'cancelled_by_concurrency_limit'
            FROM cancelled_tasks c JOIN to_cancel x ON x.task_id = c.task_id
            ORDER BY c.task_id
        ),
        freed_slots AS (
            DELETE FROM task_slots
            WHERE task_id = ANY (ARRAY(SELECT task_id FROM cancelled_tasks))
        ),
        cancelled_steps AS (
            UPDATE steps s
            SET status = 'cancelled', lease_expires_at = NULL, next_attempt_at = NULL,
                held = NULL, held_task_key = NULL, completed_at = now(), updated_at = now()
            FROM (SELECT o.step_id, o.status FROM steps o
                  WHERE o.task_id = ANY (ARRAY(SELECT task_id FROM to_cancel))
                    AND (o.status IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry'))
                        IS TRUE
                  ORDER BY o.step_id FOR UPDATE) old
            WHERE s.step_id = old.step_id
            RETURNING s.step_id, s.task_id, old.status AS from_status
        ),
        cancelled_step_history AS (
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, from_status, 'cancelled', 'task_cancelled',
                   jsonb_build_object('reason', 'concurrency limit')
            FROM cancelled_steps
            ORDER BY step_id
        ),
        changed AS (
            UPDATE steps s
            SET remaining_parents = d.remaining,
                ready_at = CASE WHEN d.done > 0 AND d.remaining = 0 THEN now() ELSE s.ready_at END,
                status = CASE WHEN d.claim THEN 'enqueued' ELSE s.status END,
                attempts = s.attempts + CASE WHEN d.claim THEN 1 ELSE 0 END,
                dispatch_token = CASE WHEN d.claim THEN gen_random_uuid() ELSE s.dispatch_token END,
                lease_expires_at = CASE WHEN d.claim
                                        THEN now() + p_lease_ms * INTERVAL '1 millisecond'
                                        ELSE s.lease_expires_at END,
                next_attempt_at = CASE WHEN d.claim THEN NULL
                                       WHEN NOT d.claimable THEN s.next_attempt_at
                                       WHEN d.held = 'rate_limited' THEN d.next_slot
                                       WHEN d.held = 'concurrency_limited' THEN NULL
                                       ELSE s.next_attempt_at END,
                held = d.held,
                held_task_key = d.held_task_key,
                enqueued_at = CASE WHEN d.claim THEN now() ELSE s.enqueued_at END,
                updated_at = CASE WHEN d.claim THEN now() ELSE s.updated_at END
            FROM decided d
            WHERE s.step_id = d.step_id
              -- A running task cancelled here as the oldest of its key: its steps are
              -- cancelled below, and left alone here (one statement updates a row once).
              AND s.task_id <> ALL (ARRAY(SELECT v.task_id FROM victims v))
              AND (d.claim OR d.done > 0 OR d.held IS DISTINCT FROM d.was_held
                   OR d.held_task_key IS DISTINCT FROM d.was_task_key
                   OR (d.claimable AND d.held = 'rate_limited' AND d.next_slot IS NOT NULL))
            RETURNING s.step_id, s.task_id, s.name, s.handler, s.config, s.attempts,
                      s.retry_limit, s.deferrals, s.dispatch_token, s.timeout_ms,
                      d.from_status, d.claim
        ),
        claimed AS (
            SELECT * FROM changed WHERE claim
        ),
        markers AS (
            -- Steps to judge whose task is not held back by its start.
            SELECT c.step_id, c.task_id, c.step_name
            FROM current c LEFT JOIN task_limits t ON t.step_id = c.step_id
            WHERE c.judge AND NOT COALESCE(t.cancel, false) AND t.waits_for IS NULL
              AND c.task_id <> ALL (ARRAY(SELECT v.task_id FROM victims v))
        ),
        step_history AS (
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, from_status, 'enqueued', 'dispatched',
                   jsonb_build_object('attempt', attempts, 'dispatch_token', dispatch_token)
            FROM claimed
            ORDER BY step_id
        ),
        started_tasks AS (
            -- Task rows are locked in id order, as everywhere else, so two coordinators
            -- starting the same tasks cannot deadlock. The tasks are found by primary key
            -- only: the status test is written so that no index can serve it (`IS TRUE`);
            -- offered `status = 'pending'`, a cached plan walked tasks_by_status.
            UPDATE tasks t SET status = 'in_progress', updated_at = now()
            WHERE t.task_id = ANY (ARRAY(
                      SELECT k.task_id FROM tasks k
                      WHERE k.task_id = ANY (ARRAY(SELECT task_id FROM claimed
                                                   UNION ALL
                                                   SELECT task_id FROM markers))
                        AND (k.status = 'pending') IS TRUE
                      ORDER BY k.task_id
                      FOR UPDATE))
              AND (t.status = 'pending') IS TRUE
            RETURNING t.task_id, t.concurrency_keys
        ),
        taken_slots AS (
            -- A task of a template with a concurrency takes a slot of each of its keys.
            INSERT INTO task_slots (key, task_id)
            SELECT k.key, s.task_id
            FROM started_tasks s CROSS JOIN LATERAL unnest(s.concurrency_keys) AS k(key)
            ON CONFLICT DO NOTHING
        ),
        task_history AS (
            INSERT INTO task_transitions (task_id, from_status, to_status, reason)
            SELECT task_id, 'pending', 'in_progress', 'first_step_dispatched'
            FROM started_tasks
            ORDER BY task_id
        )
        SELECT c.step_id, c.task_id, c.name, c.handler, c.config, c.attempts, c.retry_limit,
               c.deferrals, c.dispatch_token, c.timeout_ms, t.namespace,
               t.name || '@' || t.version, t.context,
               COALESCE((SELECT jsonb_object_agg(p.name, COALESCE(p.results, 'null'::jsonb))
                         FROM steps p
                         WHERE p.step_id = ANY (ARRAY(SELECT e.from_step FROM step_edges e
                                                      WHERE e.to_step = c.step_id))
                           AND p.status <> 'skipped'),
                        '{}'::jsonb),
               now(), t.trace_parent
        FROM claimed c JOIN tasks t ON t.task_id = c.task_id
        UNION ALL
        -- A step whose condition is to be evaluated: no message, no dispatch token.
        SELECT m.step_id, m.task_id, m.step_name, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               NULL, NULL, NULL, NULL, NULL, NULL
        FROM markers m;
    ELSE
        RETURN QUERY
        WITH input AS (
            SELECT i.step_id, COALESCE(i.done, 0) AS done
            FROM unnest(v_ids, p_parents_done) AS i(step_id, done)
            WHERE i.step_id IS NOT NULL
        ),
        current AS (
            -- One primary-key probe per input row: the caller holds these rows.
            SELECT s.step_id, s.status AS from_status, i.done,
                   s.remaining_parents - i.done AS remaining,
                   tasker_step_claimable(s.status, s.remaining_parents - i.done,
                                         s.next_attempt_at, s.attempts, s.retry_limit)
                   AND s.condition IS NULL AS claimable,
                   -- Ready but for its condition: the caller evaluates it.
                   s.condition IS NOT NULL
                   AND tasker_step_claimable(s.status, s.remaining_parents - i.done,
                                             s.next_attempt_at, s.attempts, s.retry_limit)
                       AS judge,
                   s.name AS step_name,
                   s.held AS was_held, s.held_task_key AS was_task_key, s.priority, s.created_at,
                   s.task_id, s.task_limited, s.concurrency_key, s.concurrency_limit,
                   s.rate_key, s.rate_limit, s.rate_window_ms
            FROM input i
            CROSS JOIN LATERAL (SELECT * FROM steps o WHERE o.step_id = i.step_id OFFSET 0) s
        ),
        gated AS (
            -- Each candidate with what its task's start decided (the template's
            -- concurrency), and whether its own limits are to be counted: claimable, its
            -- task not held back, with a concurrency or rate key. The rest take the rule
            -- alone. Computed over the candidates in one pass (window functions), never by
            -- joining them to per-key sets: without hash joins (this function's settings)
            -- such a join is a nested loop, quadratic in a batch.
            SELECT c.*, false AS cancel, NULL::TEXT AS waits_for,
                   c.claimable
                       AND (c.concurrency_key IS NOT NULL OR c.rate_key IS NOT NULL) AS limited
            FROM current c
        ),
        ranked AS (
            -- Per concurrency key: the rank (best first) and how many are queued or running.
            SELECT g.*,
                   row_number() OVER (PARTITION BY g.limited, g.concurrency_key
                                      ORDER BY g.priority DESC, g.created_at, g.step_id) AS rank,
                   CASE WHEN g.limited AND g.concurrency_key IS NOT NULL THEN
                       (SELECT count(*) FROM steps r
                        WHERE r.concurrency_key = g.concurrency_key
                          AND r.status IN ('enqueued', 'in_progress'))::INT
                   END AS running
            FROM gated g
        ),
        fitting AS (
            SELECT r.*,
                   NOT r.limited OR r.concurrency_key IS NULL
                       OR r.rank <= r.concurrency_limit - r.running AS fits
            FROM ranked r
        ),
        rated AS (
            -- Per rate key, among those that fit: the rank, the key's starts within the
            -- window (oldest first) and how many were claimed and have not started.
            SELECT f.*,
                   row_number() OVER (PARTITION BY f.limited AND f.fits, f.rate_key
                                      ORDER BY f.priority DESC, f.created_at, f.step_id) AS rate_rank,
                   CASE WHEN f.limited AND f.fits AND f.rate_key IS NOT NULL THEN
                       ARRAY(SELECT x.started_at FROM steps t
                             -- A start a coordinator older than this function wrote
                             -- (during a rolling upgrade) is in started_at alone.
                             CROSS JOIN LATERAL unnest(COALESCE(
                                 t.rate_starts,
                                 CASE WHEN t.status <> 'enqueued' THEN ARRAY[t.started_at] END))
                                 AS x(started_at)
                             WHERE t.rate_key = f.rate_key
                               AND t.started_at > v_now - f.rate_window_ms * INTERVAL '1 millisecond'
                               AND x.started_at > v_now - f.rate_window_ms * INTERVAL '1 millisecond'
                             ORDER BY x.started_at)
                   END AS starts,
                   CASE WHEN f.limited AND f.fits AND f.rate_key IS NOT NULL THEN
                       (SELECT count(*) FROM steps t
                        WHERE t.rate_key = f.rate_key AND t.status = 'enqueued')::INT
                   END AS pending
            FROM fitting f
        ),
        decided AS (
            -- Claim, or hold (and for a rate, until when). A step of a task cancelled here is
            -- left to the cancel below, as it was.
            SELECT r.step_id, r.from_status, r.done, r.remaining, r.claimable, r.was_held,
                   r.was_task_key,
                   r.claimable AND NOT r.cancel AND r.waits_for IS NULL AND r.fits
                       AND NOT r.rate_held AS claim,
                   CASE WHEN NOT (r.claimable OR r.judge) OR r.cancel THEN r.was_held
                        WHEN r.waits_for IS NOT NULL OR NOT r.fits THEN 'concurrency_limited'
                        WHEN r.rate_held THEN 'rate_limited'
                   END AS held,
                   CASE WHEN NOT (r.claimable OR r.judge) OR r.cancel THEN r.was_task_key
                        ELSE r.waits_for
                   END AS held_task_key,
                   -- A rate-held step's slot: when enough starts have left the window. Once
                   -- the claims of this statement are made, the window holds `used` starts
                   -- and the free slots' claims (at least the limit); the held step of rank
                   -- `rate_rank` needs `used + rate_rank - limit` of them gone. Those known are
                   -- the starts, oldest first; the rest start from now on, so at best a
                   -- window from now (checked again then).
                   CASE WHEN r.rate_held THEN
                       CASE WHEN r.used + r.rate_rank - r.rate_limit <= cardinality(r.starts)
                            THEN r.starts[(r.used + r.rate_rank - r.rate_limit)::INT]
                            ELSE v_now
                       END
                       + r.rate_window_ms * INTERVAL '1 millisecond'
                         * (1 + GREATEST(r.used + r.rate_rank - r.rate_limit
                                         - cardinality(r.starts) - 1, 0)
                                / GREATEST(r.rate_limit, 1))
                   END AS next_slot
            FROM (SELECT r.*,
                         COALESCE(cardinality(r.starts), 0) + COALESCE(r.pending, 0) AS used,
                         r.limited AND r.fits AND r.rate_key IS NOT NULL
                             AND r.rate_rank > r.rate_limit - (COALESCE(cardinality(r.starts), 0)
                                                               + COALESCE(r.pending, 0))
                             AS rate_held
                  FROM rated r) r
        ),
        changed AS (
            UPDATE steps s
            SET remaining_parents = d.remaining,
                ready_at = CASE WHEN d.done > 0 AND d.remaining = 0 THEN now() ELSE s.ready_at END,
                status = CASE WHEN d.claim THEN 'enqueued' ELSE s.status END,
                attempts = s.attempts + CASE WHEN d.claim THEN 1 ELSE 0 END,
                dispatch_token = CASE WHEN d.claim THEN gen_random_uuid() ELSE s.dispatch_token END,
                lease_expires_at = CASE WHEN d.claim
                                        THEN now() + p_lease_ms * INTERVAL '1 millisecond'
                                        ELSE s.lease_expires_at END,
                next_attempt_at = CASE WHEN d.claim THEN NULL
                                       WHEN NOT d.claimable THEN s.next_attempt_at
                                       WHEN d.held = 'rate_limited' THEN d.next_slot
                                       WHEN d.held = 'concurrency_limited' THEN NULL
                                       ELSE s.next_attempt_at END,
                held = d.held,
                held_task_key = d.held_task_key,
                enqueued_at = CASE WHEN d.claim THEN now() ELSE s.enqueued_at END,
                updated_at = CASE WHEN d.claim THEN now() ELSE s.updated_at END
            FROM decided d
            WHERE s.step_id = d.step_id
              AND (d.claim OR d.done > 0 OR d.held IS DISTINCT FROM d.was_held
                   OR d.held_task_key IS DISTINCT FROM d.was_task_key
                   OR (d.claimable AND d.held = 'rate_limited' AND d.next_slot IS NOT NULL))
            RETURNING s.step_id, s.task_id, s.name, s.handler, s.config, s.attempts,
                      s.retry_limit, s.deferrals, s.dispatch_token, s.timeout_ms,
                      d.from_status, d.claim
        ),
        claimed AS (
            SELECT * FROM changed WHERE claim
        ),
        markers AS (
            SELECT c.step_id, c.task_id, c.step_name FROM current c WHERE c.judge
        ),
        step_history AS (
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, from_status, 'enqueued', 'dispatched',
                   jsonb_build_object('attempt', attempts, 'dispatch_token', dispatch_token)
            FROM claimed
            ORDER BY step_id
        ),
        started_tasks AS (
            -- Task rows are locked in id order, as everywhere else, so two coordinators
            -- starting the same tasks cannot deadlock. The tasks are found by primary key
            -- only: the status test is written so that no index can serve it (`IS TRUE`);
            -- offered `status = 'pending'`, a cached plan walked tasks_by_status.
            UPDATE tasks t SET status = 'in_progress', updated_at = now()
            WHERE t.task_id = ANY (ARRAY(
                      SELECT k.task_id FROM tasks k
                      WHERE k.task_id = ANY (ARRAY(SELECT task_id FROM claimed
                                                   UNION ALL
                                                   SELECT task_id FROM markers))
                        AND (k.status = 'pending') IS TRUE
                      ORDER BY k.task_id
                      FOR UPDATE))
              AND (t.status = 'pending') IS TRUE
            RETURNING t.task_id, t.concurrency_keys
        ),
        task_history AS (
            INSERT INTO task_transitions (task_id, from_status, to_status, reason)
            SELECT task_id, 'pending', 'in_progress', 'first_step_dispatched'
            FROM started_tasks
            ORDER BY task_id
        )
        SELECT c.step_id, c.task_id, c.name, c.handler, c.config, c.attempts, c.retry_limit,
               c.deferrals, c.dispatch_token, c.timeout_ms, t.namespace,
               t.name || '@' || t.version, t.context,
               COALESCE((SELECT jsonb_object_agg(p.name, COALESCE(p.results, 'null'::jsonb))
                         FROM steps p
                         WHERE p.step_id = ANY (ARRAY(SELECT e.from_step FROM step_edges e
                                                      WHERE e.to_step = c.step_id))
                           AND p.status <> 'skipped'),
                        '{}'::jsonb),
               now(), t.trace_parent
        FROM claimed c JOIN tasks t ON t.task_id = c.task_id
        UNION ALL
        -- A step whose condition is to be evaluated: no message, no dispatch token.
        SELECT m.step_id, m.task_id, m.step_name, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               NULL, NULL, NULL, NULL, NULL, NULL
        FROM markers m;
    END IF;
END $$;
