-- Unfinished steps by status.
SELECT status, count(*) FROM steps
WHERE status IN ('pending', 'enqueued', 'in_progress', 'waiting_for_retry')
GROUP BY status
