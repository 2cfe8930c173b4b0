//! Healing lost work when leases expire.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::STEPS_PER_MESSAGE;
use crate::states::StepStatus;

/// What [`expire_leases`] did.
#[derive(Debug, Default)]
pub struct ExpiredLeases {
    /// Steps that were never started and will be dispatched again (no attempt spent),
    /// each with the dispatch it had: (step id, dispatch token). Any copy of those
    /// dispatches still queued is stale, and workers are told so.
    pub requeued: Vec<(Uuid, Uuid)>,
    /// Steps whose worker went silent: counted as a timed-out attempt.
    pub timed_out: usize,
    /// Of those, per step: its task's namespace and where it went, `waiting_for_retry`
    /// (a retry scheduled) or `error` (that was its last attempt).
    pub lost_workers: Vec<(String, StepStatus)>,
    /// Tasks whose steps changed.
    pub tasks: Vec<Uuid>,
}

#[derive(sqlx::FromRow)]
struct ExpiredRow {
    step_id: Uuid,
    task_id: Uuid,
    namespace: String,
    from_status: StepStatus,
    to_status: StepStatus,
    dispatch_token: Option<Uuid>,
}

/// Heal lost work. A step `enqueued` past its lease was never confirmed by the broker (the
/// coordinator died between claiming and publishing, or the publish failed), or its queue
/// was found lost ([`release_lost_queue`]): it goes back to `waiting_for_retry`, ready at
/// once, and the attempt is not counted. A step whose publish the broker confirmed has no
/// lease ([`record_publish`]): a long queue never sends it back. A step `in_progress` past its lease
/// lost its worker: that is a retryable timeout (or `error` when attempts are exhausted,
/// which counts for its clean-up and compensation children: they are left ready for the
/// dispatcher).
///
/// With `running: false` only `enqueued` steps are healed: the caller could not hear
/// workers' heartbeats lately (database or broker unreachable), so a running step's
/// expired lease may only mean its heartbeats and result are still waiting to be applied.
/// Likewise a running step of one of the `alive` workers (heard from lately, on the
/// control exchange), while within its timeout plus `grace_ms`: its heartbeats wait
/// behind results not yet applied.
pub async fn expire_leases(
    conn: &mut PgConnection,
    limit: i64,
    running: bool,
    (alive, grace_ms): (&[String], i64),
) -> sqlx::Result<ExpiredLeases> {
    let rows: Vec<ExpiredRow> =
        sqlx::query_as(include_str!("../../../sql/leases/expire_leases.sql"))
            .bind(limit)
            .bind(running)
            .bind(grace_ms)
            .bind(alive)
            .fetch_all(&mut *conn)
            .await?;
    // Out of attempts: counted for their `for_each` steps and clean-up children (which
    // the dispatcher claims once ready).
    let failed: Vec<Uuid> = rows
        .iter()
        .filter(|r| r.to_status == StepStatus::Error)
        .map(|r| r.step_id)
        .collect();
    super::failures::failed(conn, &failed).await?;

    // A claimed step always has a token: the claim set it.
    let requeued: Vec<(Uuid, Uuid)> = rows
        .iter()
        .filter(|r| r.from_status == StepStatus::Enqueued)
        .filter_map(|r| Some((r.step_id, r.dispatch_token?)))
        .collect();
    let mut tasks: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
    tasks.sort_unstable();
    tasks.dedup();
    let lost_workers: Vec<(String, StepStatus)> = rows
        .into_iter()
        .filter(|r| r.from_status == StepStatus::InProgress)
        .map(|r| (r.namespace, r.to_status))
        .collect();
    Ok(ExpiredLeases {
        timed_out: lost_workers.len(),
        lost_workers,
        requeued,
        tasks,
    })
}

/// A step whose publish the broker confirmed: its id, the dispatch token it was published
/// under, and the message it travelled in (the dispatch token of the message's first
/// step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfirmedStep {
    /// The step.
    pub step_id: Uuid,
    /// The dispatch it was published as.
    pub dispatch_token: Uuid,
    /// Its message: the dispatch token of the first step the message carries.
    pub message: Uuid,
}

/// Record what the broker did with published steps. A step whose publish it confirmed
/// is safe in a durable queue: its dispatch lease is lifted (`lease_expires_at` NULL), so
/// no wait in the queue, however long, sends it back, and the message it travelled in is
/// recorded (`dispatch_message`, what the sweeper's queue check counts). A step whose
/// message it did not take (no connection, refused, unroutable, no confirm) has its lease
/// ended at once, so the next sweep hands it back without spending an attempt. Only steps
/// still `enqueued` under the same dispatch token are touched: a step dispatched again
/// since, or already started, is left alone. One statement for both lists.
pub async fn record_publish(
    conn: &mut PgConnection,
    confirmed: &[ConfirmedStep],
    unpublished: &[(Uuid, Uuid)],
) -> sqlx::Result<u64> {
    if confirmed.is_empty() && unpublished.is_empty() {
        return Ok(0);
    }
    let n = confirmed.len() + unpublished.len();
    let (mut steps, mut tokens, mut taken, mut messages) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for step in confirmed {
        steps.push(step.step_id);
        tokens.push(step.dispatch_token);
        taken.push(true);
        messages.push(Some(step.message));
    }
    for (step, token) in unpublished {
        steps.push(*step);
        tokens.push(*token);
        taken.push(false);
        messages.push(None);
    }
    let done = sqlx::query(include_str!("../../../sql/leases/record_publish.sql"))
        .bind(&steps)
        .bind(&tokens)
        .bind(&taken)
        .bind(&messages)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Confirmed steps still waiting in their queue after `older_than_ms`, per namespace, as
/// the messages they need there: steps that travelled together count once, and a step
/// whose message is not recorded (lifted by a coordinator of an earlier release) as a
/// share of a message of up to [`STEPS_PER_MESSAGE`]. What the sweeper compares with the
/// queues (see [`release_lost_queue`]).
pub async fn confirmed_waiting(
    conn: &mut PgConnection,
    older_than_ms: i64,
) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(include_str!("../../../sql/leases/confirmed_waiting.sql"))
        .bind(older_than_ms)
        .bind(STEPS_PER_MESSAGE as i64)
        .fetch_all(conn)
        .await
}

/// End at once the lease of the confirmed steps of `namespace` still waiting after
/// `older_than_ms` (all of them when `older_than_ms` is 0) that travelled in its oldest
/// `limit` messages (`None`: all; a step whose message is not recorded counts as one):
/// those messages are gone, and the next sweep dispatches their steps again without
/// spending an attempt. Returns how many steps.
pub async fn release_lost_queue(
    conn: &mut PgConnection,
    namespace: &str,
    older_than_ms: i64,
    limit: Option<i64>,
) -> sqlx::Result<u64> {
    let done = sqlx::query(include_str!("../../../sql/leases/release_lost_queue.sql"))
        .bind(namespace)
        .bind(older_than_ms)
        .bind(limit)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}
