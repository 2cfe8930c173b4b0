-- Remove the tasks $1 with their steps, edges and both histories; count what went.
WITH gone_steps AS (
    DELETE FROM steps WHERE task_id = ANY($1) RETURNING step_id
), gone_edges AS (
    DELETE FROM step_edges WHERE from_step IN (SELECT step_id FROM gone_steps)
    RETURNING 1
), gone_step_history AS (
    DELETE FROM step_transitions WHERE task_id = ANY($1) RETURNING 1
), gone_task_history AS (
    DELETE FROM task_transitions WHERE task_id = ANY($1) RETURNING 1
), gone_tasks AS (
    DELETE FROM tasks WHERE task_id = ANY($1) RETURNING 1
)
SELECT (SELECT count(*) FROM gone_steps),
       (SELECT count(*) FROM gone_edges),
       (SELECT count(*) FROM gone_step_history)
         + (SELECT count(*) FROM gone_task_history),
       (SELECT count(*) FROM gone_tasks)
