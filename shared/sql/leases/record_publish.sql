-- Per step $1 under dispatch token $2, still `enqueued`: lift its lease when the broker
-- took the message ($3 true), recording which message it travelled in ($4: the dispatch
-- token of the message's first step); end the lease now when it did not.
UPDATE steps s
SET lease_expires_at = CASE WHEN d.taken THEN NULL ELSE now() END,
    dispatch_message = CASE WHEN d.taken THEN d.message ELSE s.dispatch_message END,
    updated_at = now()
FROM unnest($1::uuid[], $2::uuid[], $3::bool[], $4::uuid[]) AS d(step_id, dispatch_token, taken, message)
-- One primary-key probe per step: no index can serve the status test written with
-- IS TRUE (the transitions module's "Plans").
WHERE s.step_id = d.step_id AND s.dispatch_token = d.dispatch_token
  AND (s.status = 'enqueued') IS TRUE
