-- The finished tasks $1, of templates with a concurrency, give back their slots. A
-- statement of its own, run only when there are some: as a part of finish.sql it cost
-- every finish the opening of task_slots.
DELETE FROM task_slots WHERE task_id = ANY ($1)
