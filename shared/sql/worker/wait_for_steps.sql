-- Wait (up to the transaction's lock_timeout) for the rows lock_batch would lock for
-- the steps $1 and results $2, and hold them, in id order.
WITH {BATCH_ROWS}
SELECT 1 FROM steps
WHERE step_id = ANY (ARRAY(SELECT step_id FROM wanted))
ORDER BY step_id
FOR UPDATE
