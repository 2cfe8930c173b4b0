-- Whether a claim that cancelled tasks as the oldest of their template's concurrency key
-- left work behind for `unheard.sql` or `orphans.sql` (the same conditions). One read,
-- so that a sweep with nothing to do costs one statement.
SELECT EXISTS (SELECT 1 FROM steps s WHERE {WAITING_FOR_ENDED_CHILD})
       OR EXISTS (SELECT 1 FROM tasks c WHERE {ORPHAN_OF_A_CLAIM})
