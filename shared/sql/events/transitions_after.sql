-- Up to $2 transitions after the id $1, task and step ones together with schedules'
-- fires (their outcome as the reason, their schedule's template), in id order. The
-- names of the tasks and steps they are about are read once per batch
-- (events/names.sql), not once per row.
SELECT e.*, sc.namespace AS schedule_namespace, sc.template AS schedule_template,
       COALESCE(sc.version, '') AS schedule_version
FROM (
    (SELECT transition_id, created_at, task_id, NULL::uuid AS step_id, from_status,
            to_status, reason, metadata, NULL::text AS schedule
     FROM task_transitions WHERE transition_id > $1
     ORDER BY transition_id LIMIT $2)
    UNION ALL
    (SELECT transition_id, created_at, task_id, step_id, from_status, to_status, reason,
            -- Not published: whoever holds a token can complete its step.
            metadata - 'dispatch_token', NULL::text
     FROM step_transitions
     WHERE transition_id > $1
     ORDER BY transition_id LIMIT $2)
    UNION ALL
    (SELECT f.transition_id, f.created_at, f.task_id, NULL::uuid, NULL::text,
            f.outcome, 'schedule_' || f.outcome,
            jsonb_build_object('fire_at', f.fire_at, 'outcome', f.outcome), f.schedule
     FROM schedule_fires f
     WHERE f.transition_id > $1
     ORDER BY f.transition_id LIMIT $2)
) e
-- By primary key, one probe per fire (OFFSET 0 keeps the lookup where it is); rows
-- without a schedule probe for nothing.
LEFT JOIN LATERAL (SELECT c.namespace, c.template, c.version FROM schedules c
                   WHERE c.name = e.schedule OFFSET 0) sc ON true
ORDER BY e.transition_id
LIMIT $2
