-- End the lease of up to $3 (NULL: all) confirmed steps of namespace $1 queued for at
-- least $2 ms, oldest first.
UPDATE steps s
SET lease_expires_at = now(), updated_at = now()
WHERE s.step_id IN (
    SELECT s.step_id
    FROM steps s JOIN tasks t ON t.task_id = s.task_id
    WHERE t.namespace = $1
      AND s.status = 'enqueued' AND s.lease_expires_at IS NULL
      AND s.enqueued_at <= now() - $2 * interval '1 millisecond'
    ORDER BY s.enqueued_at
    LIMIT $3
)
  AND s.status = 'enqueued' AND s.lease_expires_at IS NULL
