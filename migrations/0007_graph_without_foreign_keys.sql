-- A task's graph without foreign keys. Creating a diamond checked sixteen of them: each
-- of its four steps against the task, and each of its four edges against the task and
-- both its steps. Each check is a lookup run by a trigger after the insert, plus a
-- KEY SHARE lock on the row it finds (a WAL record when the row is a step), and all of
-- it in the one statement every task creation runs (tasker-bench measured what
-- dropping them saved; BENCHMARKS.md).
--
-- Steps and edges are inserted only by tasker_create_task, in the statement that
-- inserts their task, with ids that statement has just made, so they exist by
-- construction, as migration 0005 already said of the history. Nothing deletes tasks;
-- whatever comes to delete them must delete their steps, edges and history with them,
-- in one transaction, explicitly.
ALTER TABLE steps DROP CONSTRAINT steps_task_id_fkey;
ALTER TABLE step_edges DROP CONSTRAINT step_edges_task_id_fkey;
ALTER TABLE step_edges DROP CONSTRAINT step_edges_from_step_fkey;
ALTER TABLE step_edges DROP CONSTRAINT step_edges_to_step_fkey;
