-- End the lease of the confirmed steps of namespace $1 queued for at least $2 ms that
-- travelled in the $3 (NULL: all) oldest messages. A step whose message is not recorded
-- counts as a message of its own.
WITH waiting AS (
    SELECT s.step_id, COALESCE(s.dispatch_message, s.dispatch_token) AS message,
           s.enqueued_at
    FROM steps s JOIN tasks t ON t.task_id = s.task_id
    WHERE t.namespace = $1
      AND s.status = 'enqueued' AND s.lease_expires_at IS NULL
      AND s.enqueued_at <= now() - $2 * interval '1 millisecond'
),
oldest AS (
    SELECT w.message
    FROM waiting w
    GROUP BY w.message
    ORDER BY min(w.enqueued_at)
    LIMIT $3
)
UPDATE steps s
SET lease_expires_at = now(), updated_at = now()
WHERE s.step_id IN (SELECT w.step_id FROM waiting w
                    WHERE w.message IN (SELECT o.message FROM oldest o))
  AND s.status = 'enqueued' AND s.lease_expires_at IS NULL
