-- Confirmed steps still queued after $1 ms, per namespace.
SELECT t.namespace, count(*)
FROM steps s JOIN tasks t ON t.task_id = s.task_id
WHERE s.status = 'enqueued' AND s.lease_expires_at IS NULL
  AND s.enqueued_at < now() - $1 * interval '1 millisecond'
GROUP BY t.namespace
