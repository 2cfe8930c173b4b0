-- The worker running a step (`in_progress`), from its started notice: the sweeper leaves
-- a running step whose lease ran out alone while that worker is heard from on the
-- control exchange and the step is within its timeout. Its heartbeats travel behind the
-- results, so a backlog there delays them; the worker's own status does not wait.
ALTER TABLE steps ADD COLUMN worker_id TEXT;
