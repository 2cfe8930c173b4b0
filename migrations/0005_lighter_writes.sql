-- Less work per step write. Every state change of a step rewrites its row (no HOT update
-- is possible: the status is indexed) and appends a history row, so each index and each
-- foreign key on these tables is paid several times per step. tasker-bench measured
-- what these cost and what dropping them saved (BENCHMARKS.md).

-- Unused: lookups by task use the UNIQUE (task_id, name) index, whose leading column is
-- the same, and a task's handful of steps is sorted by position after.
DROP INDEX steps_by_task;

-- Unused: a step's history is read through its task (step_transitions_by_task).
DROP INDEX step_transitions_by_step;

-- The history is written only by the statement that makes the change it records, in the
-- same transaction, so its task and step exist by construction. The foreign keys checked
-- that again with one lookup and one row lock per history row, on the task rows every
-- coordinator writes. Deleting a task still takes its history with it: the steps and
-- edges keep their cascading keys, and a task's history goes with the task explicitly
-- (nothing deletes tasks yet).
ALTER TABLE step_transitions DROP CONSTRAINT step_transitions_step_id_fkey;
ALTER TABLE step_transitions DROP CONSTRAINT step_transitions_task_id_fkey;
ALTER TABLE task_transitions DROP CONSTRAINT task_transitions_task_id_fkey;

-- Every task creation took a KEY SHARE lock on its template's row to check this key, and
-- concurrent creates of one template turned each of those locks into a new MultiXact
-- (an SLRU write, a WAL record and a rewrite of the template row's lock word), one per
-- task on the hottest row in the database. Templates are immutable and never deleted,
-- and tasks are created only by tasker_create_task with the id the lookup just returned.
ALTER TABLE tasks DROP CONSTRAINT tasks_template_id_fkey;
