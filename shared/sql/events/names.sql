-- The template and priority of each task $1, and the name of each step $2: what the
-- events of one relay batch say about them, each read once.
SELECT true AS is_task, k.task_id AS id, k.namespace, k.name, k.version, k.priority
FROM tasks k WHERE k.task_id = ANY ($1)
UNION ALL
SELECT false, s.step_id, NULL, s.name, NULL, NULL
FROM steps s WHERE s.step_id = ANY ($2)
