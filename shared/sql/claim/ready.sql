-- The dispatcher's claim: up to $1 steps the claim rule allows, higher priority first,
-- then oldest due (the steps_claim_order index), skipping rows another coordinator
-- holds and steps held by a limit (claim/held.sql offers those); lease of $2 ms.
SELECT *
FROM tasker_claim_steps(
    ARRAY(SELECT step_id
          FROM steps
          WHERE tasker_step_claimable(status, remaining_parents, next_attempt_at, attempts,
                                      retry_limit)
            AND held IS NULL
          ORDER BY priority DESC, next_attempt_at NULLS FIRST, created_at
          LIMIT $1
          FOR UPDATE SKIP LOCKED),
    NULL,
    $2,
    NULL)
