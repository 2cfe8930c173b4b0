-- Up to $2 transitions after the id $1, task and step ones together with schedules'
-- fires (their outcome as the reason, their task's when they created one), in id order.
SELECT e.*, COALESCE(t.namespace, sc.namespace) AS namespace,
       COALESCE(t.name, sc.template) AS task_name,
       COALESCE(t.version, sc.version, '') AS version, COALESCE(t.priority, 5)::SMALLINT AS priority
FROM (
    (SELECT transition_id, created_at, task_id, NULL::uuid AS step_id,
            NULL::text AS step_name, from_status, to_status, reason, metadata,
            NULL::text AS schedule
     FROM task_transitions WHERE transition_id > $1
     ORDER BY transition_id LIMIT $2)
    UNION ALL
    (SELECT st.transition_id, st.created_at, st.task_id, st.step_id, s.name,
            st.from_status, st.to_status, st.reason,
            -- Not published: whoever holds a token can complete its step.
            st.metadata - 'dispatch_token' AS metadata, NULL::text AS schedule
     FROM step_transitions st
     CROSS JOIN LATERAL (SELECT k.name FROM steps k WHERE k.step_id = st.step_id OFFSET 0) s
     WHERE st.transition_id > $1
     ORDER BY st.transition_id LIMIT $2)
    UNION ALL
    (SELECT f.transition_id, f.created_at, f.task_id, NULL::uuid, NULL::text, NULL::text,
            f.outcome, 'schedule_' || f.outcome,
            jsonb_build_object('fire_at', f.fire_at, 'outcome', f.outcome), f.schedule
     FROM schedule_fires f
     WHERE f.transition_id > $1
     ORDER BY f.transition_id LIMIT $2)
) e
-- Names by primary key, one probe per row (OFFSET 0 keeps each lookup where it is): as
-- plain joins, the planner hashed the whole tasks table at every call.
LEFT JOIN LATERAL (SELECT k.task_id, k.namespace, k.name, k.version, k.priority FROM tasks k
                   WHERE k.task_id = e.task_id OFFSET 0) t ON true
LEFT JOIN LATERAL (SELECT c.namespace, c.template, c.version FROM schedules c
                   WHERE c.name = e.schedule OFFSET 0) sc ON true
WHERE t.task_id IS NOT NULL OR e.schedule IS NOT NULL
ORDER BY e.transition_id
LIMIT $2
