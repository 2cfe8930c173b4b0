-- Up to $1 unfinished child tasks whose parent task a claim cancelled without them.
-- Locked; rows another coordinator holds are left to it.
SELECT c.task_id, c.parent_task_id, c.status
FROM tasks c
WHERE {ORPHAN_OF_A_CLAIM}
ORDER BY c.task_id
LIMIT $1
FOR UPDATE SKIP LOCKED
