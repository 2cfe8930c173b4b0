-- Heartbeats: extend the leases of the running steps $1 under tokens $2, up to their
-- timeout plus grace ($3 ms) and at most the heartbeat lease ($4 ms) from now. Answers
-- how many leases were extended, and the runs withdrawn from their worker: the step was
-- cancelled, or is no longer under that dispatch (handed back and dispatched again, or
-- removed), as `mark_started.sql` answers them.
-- One primary-key probe per step (the module's "Plans").
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[]) AS i(step_id, token)
),
locked AS (
    SELECT s.step_id, s.dispatch_token AS token, s.status
    FROM steps s
    JOIN input i ON i.step_id = s.step_id AND s.dispatch_token = i.token
    ORDER BY s.step_id
    FOR UPDATE OF s
),
extended AS (
    UPDATE steps s
    SET lease_expires_at = least(
            COALESCE(s.started_at, now()) + (s.timeout_ms + $3) * interval '1 millisecond',
            now() + $4 * interval '1 millisecond')
    FROM locked l
    WHERE s.step_id = l.step_id AND l.status = 'in_progress'
    RETURNING s.step_id
),
withdrawn AS (
    SELECT i.step_id, i.token
    FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM locked l
                      WHERE l.step_id = i.step_id AND l.token = i.token
                        AND l.status <> 'cancelled')
)
SELECT (SELECT count(*) FROM extended) AS extended,
       ARRAY(SELECT step_id FROM withdrawn ORDER BY step_id) AS withdrawn_steps,
       ARRAY(SELECT token FROM withdrawn ORDER BY step_id) AS withdrawn_tokens
