-- Held steps that may fit again, offered to the one claim (lease of $2 ms): per rate key,
-- up to $1 rate-held steps whose slot came; and, when $3, the concurrency keys with held
-- steps and a free slot as last committed (up to $1 keys), whose held steps the claim
-- offers itself, as many per key as its limit. Keys are found by skipping through the
-- held indexes, one probe per key. Keys without a free slot are left out before the
-- claim locks anything: a claim of every held key would hold them all at once, and every
-- result batch of any of them would wait for it.
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
concurrency_keys AS (
    (SELECT concurrency_key AS key FROM steps
     WHERE held = 'concurrency_limited' AND status IN ('pending', 'waiting_for_retry')
     ORDER BY concurrency_key LIMIT 1)
    UNION ALL
    SELECT (SELECT s.concurrency_key FROM steps s
            WHERE s.held = 'concurrency_limited'
              AND s.status IN ('pending', 'waiting_for_retry')
              AND s.concurrency_key > k.key
            ORDER BY s.concurrency_key LIMIT 1)
    FROM concurrency_keys k
    WHERE k.key IS NOT NULL
)
SELECT *
FROM tasker_claim_steps(
    ARRAY(SELECT h.step_id
          FROM rate_keys k
          CROSS JOIN LATERAL (
              SELECT s.step_id FROM steps s
              WHERE s.held = 'rate_limited' AND s.status IN ('pending', 'waiting_for_retry')
                AND s.rate_key = k.key AND s.next_attempt_at <= now()
              ORDER BY s.next_attempt_at
              LIMIT $1
              FOR UPDATE SKIP LOCKED) h
          WHERE k.key IS NOT NULL),
    NULL,
    $2,
    ARRAY(SELECT k.key
          FROM concurrency_keys k
          CROSS JOIN LATERAL (SELECT h.concurrency_limit FROM steps h
                              WHERE h.held = 'concurrency_limited'
                                AND h.status IN ('pending', 'waiting_for_retry')
                                AND h.concurrency_key = k.key
                              LIMIT 1) l
          WHERE k.key IS NOT NULL AND $3
            AND (SELECT count(*) FROM steps r
                 WHERE r.concurrency_key = k.key
                   AND r.status IN ('enqueued', 'in_progress')) < l.concurrency_limit
          LIMIT $1))
