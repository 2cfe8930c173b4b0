-- How many tasks each tree $1 (by its root task) holds, its root included, whatever
-- their status: its root's descendants counted up to $2.
SELECT r.root, 1 + (SELECT count(*)
                    FROM (SELECT 1 FROM tasks t WHERE t.root_task_id = r.root LIMIT $2) d)
FROM unnest($1::UUID[]) AS r(root)
