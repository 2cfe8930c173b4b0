-- Up to $2 transitions after the id $1, task and step ones together, in id order.
SELECT e.*, t.namespace, t.name AS task_name, t.version, t.priority
FROM (
    (SELECT transition_id, created_at, task_id, NULL::uuid AS step_id,
            NULL::text AS step_name, from_status, to_status, reason, metadata
     FROM task_transitions WHERE transition_id > $1
     ORDER BY transition_id LIMIT $2)
    UNION ALL
    (SELECT st.transition_id, st.created_at, st.task_id, st.step_id, s.name,
            st.from_status, st.to_status, st.reason,
            -- Not published: whoever holds a token can complete its step.
            st.metadata - 'dispatch_token' AS metadata
     FROM step_transitions st JOIN steps s USING (step_id)
     WHERE st.transition_id > $1
     ORDER BY st.transition_id LIMIT $2)
) e
JOIN tasks t USING (task_id)
ORDER BY e.transition_id
LIMIT $2
