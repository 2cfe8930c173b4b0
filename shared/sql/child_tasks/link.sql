-- The new tasks $1 are the children of the tasks $2 and steps $3 (in the same order), a
-- level below them, in their tree. Returns those that have already ended (a template
-- concurrency that cancels the newest task): their parent steps are to be judged at once.
UPDATE tasks t
SET parent_task_id = i.parent_task_id, parent_step_id = i.parent_step_id,
    depth = p.depth + 1, root_task_id = COALESCE(p.root_task_id, p.task_id)
FROM unnest($1::UUID[], $2::UUID[], $3::UUID[]) AS i(task_id, parent_task_id, parent_step_id)
JOIN tasks p ON p.task_id = i.parent_task_id
WHERE t.task_id = i.task_id
RETURNING t.task_id, t.status IN ('complete', 'error', 'cancelled', 'resolved_manually') AS ended
