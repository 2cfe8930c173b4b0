-- Confirmed steps still queued after $1 ms, per namespace: the messages they need in
-- their queue. Steps that travelled together count once; a step lifted by a coordinator
-- that did not record its message counts as a share of one ($2 steps a message, at most).
SELECT t.namespace,
       (count(DISTINCT s.dispatch_message)
        + ceil(count(*) FILTER (WHERE s.dispatch_message IS NULL) / $2::numeric))::BIGINT
FROM steps s JOIN tasks t ON t.task_id = s.task_id
WHERE s.status = 'enqueued' AND s.lease_expires_at IS NULL
  AND s.enqueued_at < now() - $1 * interval '1 millisecond'
GROUP BY t.namespace
