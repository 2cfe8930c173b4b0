-- The dispatcher's claim, one statement (lease of $2 ms): up to $1 steps the claim rule
-- allows, higher priority first, then oldest due (the steps_claim_order index), skipping
-- rows another coordinator holds and steps held by a limit; and the held steps that may
-- fit again: per rate key, up to $1 rate-held steps whose slot came; per template
-- concurrency key with fewer running tasks than its limit (up to $1 such keys), every
-- held first step of at most as many waiting tasks (best first) as the limit; and, when
-- $3, the concurrency keys with held steps and a free slot as last committed (up to $1
-- keys), whose held steps the claim offers itself, as many per key as its limit. Held
-- keys are found by skipping through the held indexes, one probe per key (none when
-- nothing is held). Keys without a free slot are left out before the claim locks
-- anything (and before the limit on keys, so full keys cannot hide those with room): a
-- claim of every held key would hold them all at once, and every result batch of any of
-- them would wait for it.
WITH RECURSIVE rate_keys AS (
    (SELECT rate_key AS key FROM steps
     WHERE held = 'rate_limited' AND status IN ('pending', 'waiting_for_retry')
     ORDER BY rate_key LIMIT 1)
    UNION ALL
    SELECT (SELECT s.rate_key FROM steps s
            WHERE s.held = 'rate_limited' AND s.status IN ('pending', 'waiting_for_retry')
              AND s.rate_key > k.key
            ORDER BY s.rate_key LIMIT 1)
    FROM rate_keys k
    WHERE k.key IS NOT NULL
),
task_keys AS (
    (SELECT held_task_key AS key FROM steps
     WHERE held_task_key IS NOT NULL AND held = 'concurrency_limited'
       AND status IN ('pending', 'waiting_for_retry')
     ORDER BY held_task_key LIMIT 1)
    UNION ALL
    SELECT (SELECT s.held_task_key FROM steps s
            WHERE s.held_task_key IS NOT NULL AND s.held = 'concurrency_limited'
              AND s.status IN ('pending', 'waiting_for_retry')
              AND s.held_task_key > k.key
            ORDER BY s.held_task_key LIMIT 1)
    FROM task_keys k
    WHERE k.key IS NOT NULL
),
task_room AS (
    -- Each such key's limit, from a waiting task, and how many of its tasks run: up to
    -- $1 keys with room (the full ones left out before the limit, so full keys that
    -- sort first cannot hide those behind them).
    SELECT * FROM (
        SELECT k.key, l.lim,
               (SELECT count(*) FROM task_slots r
                WHERE r.key = k.key
                  AND (SELECT t.status FROM tasks t WHERE t.task_id = r.task_id)
                      = 'in_progress') AS running
        FROM task_keys k
        CROSS JOIN LATERAL (
            SELECT t.concurrency_limits[array_position(t.concurrency_keys, k.key)] AS lim
            FROM steps h JOIN tasks t ON t.task_id = h.task_id
            WHERE h.held_task_key = k.key AND h.held = 'concurrency_limited'
              AND h.status IN ('pending', 'waiting_for_retry')
            LIMIT 1) l
        WHERE k.key IS NOT NULL) keyed
    WHERE keyed.running < keyed.lim
    LIMIT $1
),
concurrency_keys AS (
    -- Steps held by their own key, not those whose task waits (task_keys above).
    (SELECT concurrency_key AS key FROM steps
     WHERE held = 'concurrency_limited' AND held_task_key IS NULL
       AND status IN ('pending', 'waiting_for_retry')
     ORDER BY concurrency_key LIMIT 1)
    UNION ALL
    SELECT (SELECT s.concurrency_key FROM steps s
            WHERE s.held = 'concurrency_limited' AND s.held_task_key IS NULL
              AND s.status IN ('pending', 'waiting_for_retry')
              AND s.concurrency_key > k.key
            ORDER BY s.concurrency_key LIMIT 1)
    FROM concurrency_keys k
    WHERE k.key IS NOT NULL
),
offered AS MATERIALIZED (
    SELECT
        ARRAY(SELECT step_id
              FROM steps
              WHERE tasker_step_claimable(status, remaining_parents, next_attempt_at, attempts,
                                          retry_limit)
                AND held IS NULL
              ORDER BY priority DESC, next_attempt_at NULLS FIRST, created_at
              LIMIT $1
              FOR UPDATE SKIP LOCKED)
        || ARRAY(SELECT h.step_id
                 FROM rate_keys k
                 CROSS JOIN LATERAL (
                     SELECT s.step_id FROM steps s
                     WHERE s.held = 'rate_limited' AND s.status IN ('pending', 'waiting_for_retry')
                       AND s.rate_key = k.key AND s.next_attempt_at <= now()
                     ORDER BY s.next_attempt_at
                     LIMIT $1
                     FOR UPDATE SKIP LOCKED) h
                 WHERE k.key IS NOT NULL)
        || ARRAY(SELECT f.step_id
                 FROM task_room r
                 CROSS JOIN LATERAL (
                     SELECT DISTINCT s.task_id FROM (
                         SELECT s.task_id FROM steps s
                         WHERE s.held_task_key = r.key AND s.held = 'concurrency_limited'
                           AND s.status IN ('pending', 'waiting_for_retry')
                         ORDER BY s.priority DESC, s.created_at
                         LIMIT r.lim) s) h
                 -- Every held first step of those tasks: a task starts with all of them.
                 CROSS JOIN LATERAL (
                     SELECT f.step_id FROM steps f
                     WHERE f.task_id = h.task_id AND f.held_task_key = r.key
                       AND f.held = 'concurrency_limited'
                       AND f.status IN ('pending', 'waiting_for_retry')
                     FOR UPDATE SKIP LOCKED) f
                 WHERE r.running < r.lim) AS ids,
        ARRAY(SELECT k.key
              FROM concurrency_keys k
              CROSS JOIN LATERAL (SELECT h.concurrency_limit FROM steps h
                                  WHERE h.held = 'concurrency_limited'
                                    AND h.held_task_key IS NULL
                                    AND h.status IN ('pending', 'waiting_for_retry')
                                    AND h.concurrency_key = k.key
                                  LIMIT 1) l
              WHERE k.key IS NOT NULL AND $3
                AND (SELECT count(*) FROM steps r
                     WHERE r.concurrency_key = k.key
                       AND r.status IN ('enqueued', 'in_progress')) < l.concurrency_limit
              LIMIT $1) AS keys
)
-- Nothing offered: the claim is not called at all.
SELECT c.*
FROM offered o
CROSS JOIN LATERAL tasker_claim_steps(o.ids, NULL, $2, o.keys) c
WHERE cardinality(o.ids) > 0 OR cardinality(o.keys) > 0
