-- What failed in each of the tasks $1: its failed steps' names and messages.
SELECT task_id,
       string_agg(name || ': ' || COALESCE(last_error ->> 'message', 'failed'), '; '
                  ORDER BY position, item_index NULLS FIRST) AS failure
FROM steps
WHERE task_id = ANY ($1) AND status = 'error'
GROUP BY task_id
