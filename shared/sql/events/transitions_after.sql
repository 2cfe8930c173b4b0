-- Of the $2 transitions after the id $1 (task and step ones together with schedules'
-- fires: their outcome as the reason, their schedule's template), in id order: each
-- that may be an event, each that follows a gap in the ids (`previous` is the id before
-- it among those $2; the relay waits for a gap's transaction to commit), and the last
-- (the cursor moves to it). A step's row is returned only when its status is among $3,
-- those that may become a published event: never a move to `enqueued` or back to
-- `pending` (a claim, a quarter of the history), none when no step event is published;
-- the window reads every row all the same, for the gaps and the last. The names of the
-- tasks and steps are read once per batch (events/names.sql), not once per row.
WITH window_rows AS (
    SELECT e.*,
           lag(e.transition_id) OVER (ORDER BY e.transition_id) AS previous,
           max(e.transition_id) OVER () AS last
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
        ORDER BY transition_id
        LIMIT $2
    ) e
)
SELECT w.transition_id, w.previous, w.created_at, w.task_id, w.step_id, w.from_status,
       w.to_status, w.reason, w.metadata, w.schedule,
       sc.namespace AS schedule_namespace, sc.template AS schedule_template,
       COALESCE(sc.version, '') AS schedule_version
FROM window_rows w
-- By primary key, one probe per fire (OFFSET 0 keeps the lookup where it is); rows
-- without a schedule probe for nothing.
LEFT JOIN LATERAL (SELECT c.namespace, c.template, c.version FROM schedules c
                   WHERE c.name = w.schedule OFFSET 0) sc ON true
WHERE w.step_id IS NULL OR w.to_status = ANY ($3)
   OR w.transition_id <> COALESCE(w.previous, $1) + 1
   OR w.transition_id = w.last
ORDER BY w.transition_id
