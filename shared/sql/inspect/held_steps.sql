-- Steps held by a limit, by reason (`concurrency_limited`, `rate_limited`).
SELECT held, count(*) FROM steps
WHERE held IS NOT NULL AND status IN ('pending', 'waiting_for_retry')
GROUP BY held
