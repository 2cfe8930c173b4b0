-- The root task of a child task's tree: the task at depth 0 that it descends from (NULL
-- for a root itself). A `tasker.task` step counts its tree's tasks by it before it
-- starts a child, so a template that starts itself from several steps, which grows as
-- a tree, stops at TASKER_MAX_TASK_TREE tasks.
ALTER TABLE tasks ADD COLUMN root_task_id UUID;

-- From the roots of the trees there are (found from their children, by index).
WITH RECURSIVE tree AS (
    SELECT t.task_id, t.task_id AS root_task_id
    FROM tasks t
    WHERE t.task_id IN (SELECT c.parent_task_id FROM tasks c WHERE c.parent_task_id IS NOT NULL)
      AND t.parent_task_id IS NULL
    UNION ALL
    SELECT c.task_id, tree.root_task_id
    FROM tasks c JOIN tree ON c.parent_task_id = tree.task_id
)
UPDATE tasks t SET root_task_id = tree.root_task_id
FROM tree
WHERE t.task_id = tree.task_id AND t.task_id <> tree.root_task_id;

CREATE INDEX tasks_by_root ON tasks (root_task_id) WHERE root_task_id IS NOT NULL;
