-- What failed in each of the tasks $1: its failed steps' names and messages, and the
-- code of one that failed for the bounds of child tasks (one of the codes $2, there or
-- further down): no retry of the task can mend that.
SELECT task_id,
       string_agg(name || ': ' || COALESCE(last_error ->> 'message', 'failed'), '; '
                  ORDER BY position, item_index NULLS FIRST) AS failure,
       min(last_error ->> 'code') FILTER (WHERE last_error ->> 'code' = ANY ($2)) AS unmendable
FROM steps
WHERE task_id = ANY ($1) AND status = 'error'
GROUP BY task_id
