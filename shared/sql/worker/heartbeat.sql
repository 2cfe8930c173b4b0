-- Heartbeats: extend the leases of the running steps $1 under tokens $2, up to their
-- timeout plus grace ($3 ms) and at most the heartbeat lease ($4 ms) from now.
-- One primary-key probe per step (the module's "Plans").
WITH locked AS (
    SELECT s.step_id, s.status
    FROM steps s
    JOIN unnest($1::uuid[], $2::uuid[]) AS i(step_id, token)
      ON i.step_id = s.step_id AND s.dispatch_token = i.token
    ORDER BY s.step_id
    FOR UPDATE OF s
)
UPDATE steps s
SET lease_expires_at = least(
        COALESCE(s.started_at, now()) + (s.timeout_ms + $3) * interval '1 millisecond',
        now() + $4 * interval '1 millisecond')
FROM locked l
WHERE s.step_id = l.step_id AND l.status = 'in_progress'
