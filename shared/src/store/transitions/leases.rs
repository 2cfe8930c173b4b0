//! Healing lost work when leases expire.

use sqlx::PgConnection;
use uuid::Uuid;

/// What [`expire_leases`] did.
#[derive(Debug, Default)]
pub struct ExpiredLeases {
    /// Steps that were never started and will be dispatched again (no attempt spent).
    pub requeued: usize,
    /// Steps whose worker went silent: counted as a timed-out attempt.
    pub timed_out: usize,
    /// Tasks whose steps changed.
    pub tasks: Vec<Uuid>,
}

#[derive(sqlx::FromRow)]
struct ExpiredRow {
    task_id: Uuid,
    from_status: String,
}

/// Heal lost work. A step `enqueued` past its lease was never started (its message was
/// lost, or the coordinator died before publishing): it goes back to `waiting_for_retry`,
/// ready at once, and the attempt is not counted. A step `in_progress` past its lease
/// lost its worker: that is a retryable timeout (or `error` when attempts are exhausted).
///
/// With `running: false` only `enqueued` steps are healed: the caller could not hear
/// workers' heartbeats lately (database or broker unreachable), so a running step's
/// expired lease may only mean its heartbeats and result are still waiting to be applied.
pub async fn expire_leases(
    conn: &mut PgConnection,
    limit: i64,
    running: bool,
) -> sqlx::Result<ExpiredLeases> {
    let rows: Vec<ExpiredRow> = sqlx::query_as(
        r#"
        WITH expired AS (
            SELECT step_id, status AS from_status,
                   -- When it may run again: at once if it never started, after its
                   -- backoff if its worker was lost, never if that was its last attempt.
                   CASE
                       WHEN status = 'enqueued' THEN now()
                       WHEN NOT retryable OR attempts >= retry_limit THEN NULL
                       ELSE now() + tasker_backoff_ms(attempts, NULL, backoff_base_ms,
                                                      backoff_max_ms, backoff_jitter,
                                                      backoff_schedule_ms)
                                    * interval '1 millisecond'
                   END AS next_attempt_at
            FROM steps
            WHERE (status = 'enqueued' OR (status = 'in_progress' AND $2))
              AND lease_expires_at < now()
            ORDER BY lease_expires_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        ),
        updated AS (
            UPDATE steps s
            SET status = CASE
                    WHEN e.from_status = 'enqueued' THEN 'waiting_for_retry'
                    WHEN NOT s.retryable OR s.attempts >= s.retry_limit THEN 'error'
                    ELSE 'waiting_for_retry'
                END,
                attempts = CASE WHEN e.from_status = 'enqueued' THEN s.attempts - 1
                                ELSE s.attempts END,
                next_attempt_at = e.next_attempt_at,
                ready_at = e.next_attempt_at,
                last_error = CASE
                    WHEN e.from_status = 'in_progress' THEN jsonb_build_object(
                        'kind', 'timeout', 'code', 'lease_expired',
                        'message', 'no result from the worker within timeout_ms plus the lease grace')
                    ELSE s.last_error
                END,
                completed_at = CASE WHEN e.from_status = 'in_progress'
                                         AND (NOT s.retryable OR s.attempts >= s.retry_limit)
                                    THEN now() END,
                lease_expires_at = NULL,
                updated_at = now()
            FROM expired e
            WHERE s.step_id = e.step_id
            RETURNING s.step_id, s.task_id, s.status AS to_status, s.attempts, e.from_status
        ),
        history AS (
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, from_status, to_status,
                   CASE WHEN from_status = 'enqueued' THEN 'lease_lost' ELSE 'lease_expired' END,
                   jsonb_build_object('attempt', attempts)
            FROM updated
        )
        SELECT task_id, from_status FROM updated
        "#,
    )
    .bind(limit)
    .bind(running)
    .fetch_all(conn)
    .await?;

    let requeued = rows.iter().filter(|r| r.from_status == "enqueued").count();
    let mut tasks: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
    tasks.sort_unstable();
    tasks.dedup();
    Ok(ExpiredLeases {
        requeued,
        timed_out: rows.len() - requeued,
        tasks,
    })
}

/// End at once the dispatch lease of steps whose message the broker did not take (no
/// connection, refused, unroutable), so the next sweep hands them back without spending
/// an attempt instead of leaving them `enqueued` for the whole lease. Only steps still
/// `enqueued` under the same dispatch token are touched: a step dispatched again since,
/// or already started (its message got through after all), is left alone.
pub async fn release_unpublished(
    conn: &mut PgConnection,
    dispatches: &[(Uuid, Uuid)],
) -> sqlx::Result<u64> {
    if dispatches.is_empty() {
        return Ok(0);
    }
    let (steps, tokens): (Vec<Uuid>, Vec<Uuid>) = dispatches.iter().copied().unzip();
    let done = sqlx::query(
        r#"
        UPDATE steps s
        SET lease_expires_at = now(), updated_at = now()
        FROM unnest($1::uuid[], $2::uuid[]) AS d(step_id, dispatch_token)
        WHERE s.step_id = d.step_id AND s.dispatch_token = d.dispatch_token
          AND s.status = 'enqueued'
        "#,
    )
    .bind(&steps)
    .bind(&tokens)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
