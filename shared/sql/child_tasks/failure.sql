-- What failed in each of the tasks $1: its failed steps' names and messages, and whether
-- one of them failed for the depth of child tasks (`child_task_too_deep`, there or
-- further down): no retry of the task can mend that.
SELECT task_id,
       string_agg(name || ': ' || COALESCE(last_error ->> 'message', 'failed'), '; '
                  ORDER BY position, item_index NULLS FIRST) AS failure,
       COALESCE(bool_or(last_error ->> 'code' = 'child_task_too_deep'), false) AS too_deep
FROM steps
WHERE task_id = ANY ($1) AND status = 'error'
GROUP BY task_id
