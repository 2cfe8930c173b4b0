-- Per step $1 under dispatch token $2, still `enqueued`: lift its lease when the broker
-- took the message ($3 true), end it now when not.
UPDATE steps s
SET lease_expires_at = CASE WHEN d.taken THEN NULL ELSE now() END, updated_at = now()
FROM unnest($1::uuid[], $2::uuid[], $3::bool[]) AS d(step_id, dispatch_token, taken)
-- One primary-key probe per step: no index can serve the status test written with
-- IS TRUE (the transitions module's "Plans").
WHERE s.step_id = d.step_id AND s.dispatch_token = d.dispatch_token
  AND (s.status = 'enqueued') IS TRUE
