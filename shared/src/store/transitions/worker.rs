//! What workers report: started notices, heartbeats and results.

use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::{Outcome, RunningStep, StepResult, StepStarted};

/// Leases of running steps: how long a step may run before it counts as lost.
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    /// Added to the step's `timeout_ms`: the longest a run may take in any case.
    pub grace_ms: i64,
    /// Without a heartbeat for this long, the worker counts as gone.
    pub heartbeat_lease_ms: i64,
}

/// A started notice with the worker that sent it.
#[derive(Debug, Clone)]
pub struct Started {
    /// The worker.
    pub worker_id: String,
    /// The notice.
    pub step: StepStarted,
}

/// Mark steps `in_progress` from workers' started notices (all workers of a batch in one
/// statement), with a lease of `min(timeout + grace, heartbeat lease)`.
///
/// A notice for a step that is already running under the same dispatch token, on a
/// redelivered message and with another start time, means a second run: its first
/// worker died mid-step, or lost its broker connection and may still be running it. The
/// new run counts as a new attempt, even past the retry limit, since the first run may
/// yet answer; the dispatch token lets only one result through. A notice applied again
/// (a redelivered batch of notices) carries the start time already stored and changes
/// nothing. Notices for steps that moved on are ignored. Returns, per step that changed,
/// its queue latency in seconds (from becoming ready to starting).
pub async fn mark_started(
    conn: &mut PgConnection,
    started: &[Started],
    lease: LeasePolicy,
) -> sqlx::Result<Vec<f64>> {
    if started.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::bool[],
                                 $7::text[])
                AS i(step_id, token, started_at, redelivered, worker_id)
        ),
        -- By primary key only (the module's "Plans"). The status is checked in `moved`.
        locked AS (
            SELECT s.step_id, s.status AS from_status, i.started_at, i.worker_id,
                   i.redelivered AND i.started_at IS DISTINCT FROM s.started_at AS new_run
            FROM steps s JOIN input i ON i.step_id = s.step_id AND s.dispatch_token = i.token
            WHERE s.step_id = ANY ($1)
            ORDER BY s.step_id
            FOR UPDATE OF s
        ),
        moved AS (
            UPDATE steps s
            SET status = 'in_progress',
                started_at = l.started_at,
                attempts = s.attempts + CASE WHEN l.from_status = 'in_progress' THEN 1 ELSE 0 END,
                lease_expires_at = now() + least(s.timeout_ms + $5, $6) * interval '1 millisecond',
                updated_at = now()
            FROM locked l
            WHERE s.step_id = l.step_id
              AND (l.from_status = 'enqueued' OR (l.from_status = 'in_progress' AND l.new_run))
            RETURNING s.step_id, s.task_id, s.attempts, l.from_status, l.worker_id,
                      greatest(extract(epoch FROM l.started_at - s.ready_at), 0)::float8 AS latency
        ),
        history AS (
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, from_status, 'in_progress',
                   CASE WHEN from_status = 'in_progress' THEN 'restarted_after_redelivery' ELSE 'started' END,
                   jsonb_build_object('attempt', attempts, 'worker_id', worker_id)
            FROM moved
        )
        SELECT COALESCE(latency, 0) FROM moved
        "#,
    )
    .bind(started.iter().map(|s| s.step.step_id).collect::<Vec<_>>())
    .bind(started.iter().map(|s| s.step.dispatch_token).collect::<Vec<_>>())
    .bind(started.iter().map(|s| s.step.started_at).collect::<Vec<_>>())
    .bind(started.iter().map(|s| s.step.redelivered).collect::<Vec<_>>())
    .bind(lease.grace_ms)
    .bind(lease.heartbeat_lease_ms)
    .bind(started.iter().map(|s| s.worker_id.clone()).collect::<Vec<_>>())
    .fetch_all(conn)
    .await
}

/// A step [`lock_batch`] could not lock: another transaction holds its row, or for a
/// result the row of one of its children.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HeldStep {
    /// The step.
    pub step_id: Uuid,
    /// Its status as last committed. The holder may be changing it.
    pub status: String,
}

impl HeldStep {
    /// Whether a started notice or heartbeat for the step may still matter once the
    /// holder commits: the step was still queued or running, and the holder may leave it
    /// so (a heartbeat, a duplicate notice). Otherwise the step has moved on and the
    /// notice is moot.
    pub fn may_still_run(&self) -> bool {
        matches!(self.status.as_str(), "enqueued" | "in_progress")
    }
}

/// Lock every step a batch of worker messages will change, without waiting: the steps
/// named by `steps` (started notices, heartbeats, results) and the children of
/// `results`, whose parent counts the results decrement. Returns the steps of `steps`
/// that another transaction holds: the caller applies the messages for the others, and
/// keeps those for a later batch.
///
/// Two coordinators often apply results of sibling steps at once (the two middle steps
/// of a diamond share a child), and a step's started notice and result often reach
/// different coordinators. Waiting for each other's locks serialized their batches, and
/// a batch waiting halfway held the rows it had locked so far, so the other's next batch
/// waited too: two coordinators ran diamonds up to a third slower than one
/// (BENCHMARKS.md). Skipping what is held never waits, so it cannot deadlock either: the
/// statements that follow only touch rows locked here. A step whose row does not exist
/// is not held; applying its message counts it as stale.
pub async fn lock_batch(
    conn: &mut PgConnection,
    steps: &[Uuid],
    results: &[Uuid],
) -> sqlx::Result<Vec<HeldStep>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        r#"
        WITH {BATCH_ROWS},
        locked AS MATERIALIZED (
            SELECT step_id FROM steps
            WHERE step_id = ANY (ARRAY(SELECT step_id FROM wanted))
            ORDER BY step_id
            FOR UPDATE SKIP LOCKED
        ),
        held AS (
            -- Rows that exist but were skipped: another transaction holds them.
            SELECT step_id FROM steps
            WHERE step_id = ANY (ARRAY(SELECT step_id FROM wanted
                                       EXCEPT SELECT step_id FROM locked))
        )
        SELECT s.step_id, s.status
        FROM steps s
        WHERE s.step_id = ANY (ARRAY(
            SELECT step_id FROM unnest($1::uuid[]) AS w(step_id)
            WHERE step_id IN (SELECT step_id FROM held)
            UNION
            SELECT step_id FROM children WHERE to_step IN (SELECT step_id FROM held)))
        "#
    )))
    .bind(steps)
    .bind(results)
    .fetch_all(conn)
    .await
}

/// The rows a batch of worker messages changes, as two CTEs for [`lock_batch`] and
/// [`wait_for_steps`], which must agree on them: `children` (each result in `$2` with
/// a child, one index probe per result: the module's "Plans") and `wanted` (the steps
/// in `$1` and those children).
const BATCH_ROWS: &str = r#"
    children AS (
        SELECT r.step_id, e.to_step
        FROM unnest($2::uuid[]) AS r(step_id)
        CROSS JOIN LATERAL (SELECT to_step FROM step_edges
                            WHERE from_step = r.step_id OFFSET 0) e
    ),
    wanted AS (
        SELECT step_id FROM unnest($1::uuid[]) AS w(step_id)
        UNION
        SELECT to_step FROM children
    )"#;

/// Wait, up to `timeout`, until no other transaction holds the rows [`lock_batch`]
/// would lock for these steps and results; returns whether they came free. The rows
/// are locked in id order and stay locked until the caller's transaction ends: call it
/// in a transaction of its own, before anything else, and end that transaction at once.
/// It cannot deadlock: it holds nothing else, takes its rows in order, and the batches
/// it waits for never wait on step rows. While it waits, the rows it already has are
/// skipped by other batches (held back, not waited on), for at most `timeout`; a wait
/// in the middle of a batch held a whole batch's rows for as long as it took. The
/// caller's batch then finds the rows free, instead of polling for them.
pub async fn wait_for_steps(
    conn: &mut PgConnection,
    steps: &[Uuid],
    results: &[Uuid],
    timeout: std::time::Duration,
) -> sqlx::Result<bool> {
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", timeout.as_millis().max(1)))
        .execute(&mut *conn)
        .await?;
    let waited = sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"
        WITH {BATCH_ROWS}
        SELECT 1 FROM steps
        WHERE step_id = ANY (ARRAY(SELECT step_id FROM wanted))
        ORDER BY step_id
        FOR UPDATE
        "#
    )))
    .bind(steps)
    .bind(results)
    .execute(conn)
    .await;
    match waited {
        Ok(_) => Ok(true),
        // lock_not_available: the lock timeout passed.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03") => Ok(false),
        Err(error) => Err(error),
    }
}

/// Extend the leases of steps a worker says it is still running, up to the step's
/// timeout plus grace. Not a state change, so nothing is added to the history.
/// Returns how many leases were extended.
pub async fn heartbeat(
    conn: &mut PgConnection,
    running: &[RunningStep],
    lease: LeasePolicy,
) -> sqlx::Result<u64> {
    if running.is_empty() {
        return Ok(0);
    }
    let result = sqlx::query(
        r#"
        -- By primary key only (the module's "Plans").
        WITH locked AS (
            SELECT s.step_id, s.status
            FROM steps s
            JOIN unnest($1::uuid[], $2::uuid[]) AS i(step_id, token)
              ON i.step_id = s.step_id AND s.dispatch_token = i.token
            WHERE s.step_id = ANY ($1)
            ORDER BY s.step_id
            FOR UPDATE OF s
        )
        UPDATE steps s
        SET lease_expires_at = least(
                COALESCE(s.started_at, now()) + (s.timeout_ms + $3) * interval '1 millisecond',
                now() + $4 * interval '1 millisecond')
        FROM locked l
        WHERE s.step_id = l.step_id AND l.status = 'in_progress'
        "#,
    )
    .bind(running.iter().map(|s| s.step_id).collect::<Vec<_>>())
    .bind(running.iter().map(|s| s.dispatch_token).collect::<Vec<_>>())
    .bind(lease.grace_ms)
    .bind(lease.heartbeat_lease_ms)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// What [`apply_results`] did.
#[derive(Debug, Default)]
pub struct AppliedResults {
    /// Results that changed a step.
    pub applied: usize,
    /// Results dropped by the fence (late, duplicated, or for a step that moved on).
    pub stale: usize,
    /// Steps now waiting for a later attempt: the dispatcher must wake when it is due.
    pub retries_scheduled: usize,
    /// Tasks whose steps changed, sorted. [`AppliedResults::may_finish`] says which of
    /// them the caller should try to finish with [`super::finish_tasks`].
    pub tasks: Vec<Uuid>,
    /// Each applied result: the step's namespace, new status and whether it was a deferral.
    pub changes: Vec<StepChange>,
    /// Children the results made ready, claimed by the same statement: the caller
    /// publishes them ([`super::dispatches_for`]) after the commit.
    pub claimed: Vec<Uuid>,
}

impl AppliedResults {
    /// The changed tasks that may have finished, given `dispatched`: the children this
    /// statement claimed ([`super::dispatches_for`]). A task with a step just claimed,
    /// or just sent to wait for a retry, still has work, so only the others are worth
    /// locking and counting. Over diamonds that is half of them: the first step's and
    /// the last parent's results each claim the next steps.
    pub fn may_finish(&self, dispatched: &[super::Dispatch]) -> Vec<Uuid> {
        let busy: std::collections::HashSet<Uuid> = dispatched
            .iter()
            .map(|d| d.message.task_id)
            .chain(
                self.changes
                    .iter()
                    .filter(|c| c.waits_for_retry())
                    .map(|c| c.task_id),
            )
            .collect();
        self.tasks
            .iter()
            .filter(|task| !busy.contains(task))
            .copied()
            .collect()
    }
}

#[derive(sqlx::FromRow)]
struct ResultRow {
    #[sqlx(flatten)]
    change: StepChange,
    claimed: Vec<Uuid>,
}

/// One applied result.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepChange {
    /// The step's task.
    pub task_id: Uuid,
    /// The task's namespace.
    pub namespace: String,
    /// `complete`, `waiting_for_retry` or `error`.
    pub to_status: String,
    /// Whether the result was a deferral.
    pub deferred: bool,
    /// From ready to started, when this result overtook its started notice (otherwise
    /// [`mark_started`] reported it).
    pub queue_latency: Option<f64>,
}

impl StepChange {
    /// The result sent the step to wait for another attempt (a retry or a deferral).
    pub fn waits_for_retry(&self) -> bool {
        self.to_status == "waiting_for_retry"
    }
}

/// Apply a batch of results:
/// - success completes the step and makes its children one parent closer to ready; a
///   child whose last parent this was is claimed at once, as [`super::claim_ready`]
///   would (`enqueued`, a fresh dispatch token, a lease of `lease_ms`);
/// - a deferral schedules the step again after the handler's delay, refunding the
///   attempt, unless the step used up its `max_deferrals` (then `error`);
/// - a retryable failure schedules the next attempt after the backoff
///   (`tasker_backoff_ms`: the handler's `retry_after` capped by the step's maximum, or
///   the step's policy);
/// - a permanent failure, a non-retryable step or the last attempt failing: `error`.
pub async fn apply_results(
    conn: &mut PgConnection,
    results: &[StepResult],
    lease_ms: i64,
) -> sqlx::Result<AppliedResults> {
    // One result per step per batch: a duplicate in the same batch is stale by definition.
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&StepResult> = results
        .iter()
        .filter(|r| seen.insert((r.step_id, r.dispatch_token)))
        .collect();
    if unique.is_empty() {
        return Ok(AppliedResults::default());
    }
    let outcome = |r: &StepResult| match r.outcome {
        Outcome::Success => "success",
        Outcome::RetryableError => "retryable_error",
        Outcome::PermanentError => "permanent_error",
        Outcome::Deferred => "deferred",
    };
    let rows: Vec<ResultRow> = sqlx::query_as(
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[],
                                 $6::float8[], $7::timestamptz[], $8::timestamptz[], $9::text[])
                AS i(step_id, token, outcome, results, error, retry_after, started_at,
                     finished_at, worker_id)
        ),
        current AS (
            SELECT s.step_id, s.status AS from_status, s.attempts, s.retry_limit, s.retryable,
                   s.backoff_base_ms, s.backoff_max_ms, s.backoff_jitter, s.backoff_schedule_ms,
                   s.deferrals, s.max_deferrals, i.outcome, i.results, i.error,
                   i.retry_after, i.started_at, i.finished_at, i.worker_id,
                   -- The started notice has not been applied (the result overtook it):
                   -- this result carries the queue latency.
                   CASE WHEN s.status = 'enqueued'
                        THEN greatest(extract(epoch FROM i.started_at - s.ready_at), 0)::float8
                   END AS queue_latency
            -- By primary key only (the module's "Plans"). The status is checked in `decided`.
            FROM steps s JOIN input i ON i.step_id = s.step_id AND s.dispatch_token = i.token
            WHERE s.step_id = ANY ($1)
            ORDER BY s.step_id
            FOR UPDATE OF s
        ),
        decided AS (
            SELECT c.*,
                   CASE
                       WHEN c.outcome = 'success' THEN 'complete'
                       WHEN c.outcome = 'deferred' AND c.deferrals >= c.max_deferrals THEN 'error'
                       WHEN c.outcome = 'deferred' THEN 'waiting_for_retry'
                       WHEN c.outcome = 'permanent_error' OR NOT c.retryable
                            OR c.attempts >= c.retry_limit THEN 'error'
                       ELSE 'waiting_for_retry'
                   END AS to_status,
                   CASE
                       WHEN c.outcome = 'deferred'
                           THEN least(greatest(COALESCE(c.retry_after, c.backoff_base_ms / 1000.0), 0),
                                      86400) * 1000
                       ELSE tasker_backoff_ms(c.attempts, c.retry_after, c.backoff_base_ms,
                                              c.backoff_max_ms, c.backoff_jitter,
                                              c.backoff_schedule_ms)
                   END AS delay_ms
            FROM current c
            WHERE c.from_status IN ('enqueued', 'in_progress')
        ),
        updated AS (
            UPDATE steps s
            SET status = d.to_status,
                results = CASE WHEN d.to_status = 'complete' THEN d.results ELSE s.results END,
                last_error = CASE
                    WHEN d.to_status = 'complete' THEN NULL
                    WHEN d.outcome = 'deferred' AND d.to_status = 'error' THEN jsonb_build_object(
                        'kind', 'deferred', 'code', 'deferral_limit',
                        'message', 'deferred ' || d.deferrals || ' times, the step''s max_deferrals; last reason: '
                                   || COALESCE(d.error ->> 'message', 'none given'))
                    ELSE d.error
                END,
                attempts = CASE WHEN d.outcome = 'deferred' THEN s.attempts - 1 ELSE s.attempts END,
                deferrals = CASE WHEN d.outcome = 'deferred' AND d.to_status = 'waiting_for_retry'
                                 THEN s.deferrals + 1 ELSE s.deferrals END,
                next_attempt_at = CASE WHEN d.to_status = 'waiting_for_retry'
                                       THEN now() + d.delay_ms * interval '1 millisecond' END,
                ready_at = CASE WHEN d.to_status = 'waiting_for_retry'
                                THEN now() + d.delay_ms * interval '1 millisecond'
                                ELSE s.ready_at END,
                started_at = d.started_at,
                completed_at = CASE WHEN d.to_status IN ('complete', 'error')
                                    THEN d.finished_at END,
                lease_expires_at = NULL,
                updated_at = now()
            FROM decided d
            WHERE s.step_id = d.step_id
            RETURNING s.step_id, s.task_id, d.attempts, s.next_attempt_at, d.from_status,
                      d.retryable,
                      d.to_status, d.outcome, d.worker_id, d.finished_at, d.started_at,
                      d.error ->> 'code' AS code, d.queue_latency
        ),
        history AS (
            -- A result that overtook its started notice also records the start, so the
            -- history (and the events derived from it) always has step.started before
            -- the outcome. Rows are inserted in (step, order) so their ids follow.
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT h.step_id, h.task_id, h.from_status, h.to_status, h.reason, h.metadata
            FROM (
                SELECT step_id, task_id, 1 AS n, 'enqueued' AS from_status,
                       'in_progress' AS to_status, 'started' AS reason,
                       jsonb_build_object('attempt', attempts, 'worker_id', worker_id) AS metadata
                FROM updated WHERE from_status = 'enqueued'
                UNION ALL
                SELECT step_id, task_id, 2, 'in_progress', to_status,
                       CASE
                           WHEN to_status = 'complete' THEN 'succeeded'
                           WHEN outcome = 'deferred' AND to_status = 'error' THEN 'deferral_limit'
                           WHEN outcome = 'deferred' THEN 'deferred'
                           WHEN to_status = 'waiting_for_retry' THEN 'retry_scheduled'
                           WHEN outcome = 'retryable_error' AND NOT retryable THEN 'not_retryable'
                           WHEN outcome = 'retryable_error' THEN 'attempts_exhausted'
                           ELSE 'failed'
                       END,
                       jsonb_strip_nulls(jsonb_build_object(
                           'attempt', attempts, 'worker_id', worker_id, 'error_code', code,
                           'duration_ms', round(extract(epoch FROM finished_at - started_at) * 1000),
                           'next_attempt_at', next_attempt_at))
                FROM updated
            ) h
            ORDER BY h.step_id, h.n
            RETURNING 1
        ),
        children AS (
            -- One parent closer to ready; a pending child whose last parent this is gets
            -- claimed in the same write, as claim_ready would claim it: no second
            -- version of its row, and no trip through the ready index.
            UPDATE steps c
            SET remaining_parents = c.remaining_parents - x.done,
                ready_at = CASE WHEN c.remaining_parents = x.done THEN now() ELSE c.ready_at END,
                status = CASE WHEN x.claim THEN 'enqueued' ELSE c.status END,
                attempts = c.attempts + CASE WHEN x.claim THEN 1 ELSE 0 END,
                dispatch_token = CASE WHEN x.claim THEN gen_random_uuid() ELSE c.dispatch_token END,
                lease_expires_at = CASE WHEN x.claim THEN now() + $10 * interval '1 millisecond'
                                        ELSE c.lease_expires_at END,
                enqueued_at = CASE WHEN x.claim THEN now() ELSE c.enqueued_at END,
                updated_at = CASE WHEN x.claim THEN now() ELSE c.updated_at END
            FROM (SELECT k.step_id AS to_step, d.done,
                         k.status = 'pending' AND k.remaining_parents = d.done
                             AND (k.next_attempt_at IS NULL OR k.next_attempt_at <= now())
                             AND k.attempts < k.retry_limit AS claim
                  FROM (SELECT e.to_step, count(*)::int AS done
                        FROM updated u
                        CROSS JOIN LATERAL (SELECT to_step FROM step_edges
                                            WHERE from_step = u.step_id OFFSET 0) e
                        WHERE u.to_status = 'complete'
                        GROUP BY e.to_step) d
                  JOIN steps k ON k.step_id = d.to_step) x
            WHERE c.step_id = x.to_step
            RETURNING c.step_id, c.task_id, c.attempts, c.dispatch_token, x.claim
        ),
        dispatched AS (
            -- After the results' own rows (reading `history` makes it run first), so a
            -- child's dispatch follows its parent's completion in the history and in the
            -- events.
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, 'pending', 'enqueued', 'dispatched',
                   jsonb_build_object('attempt', attempts, 'dispatch_token', dispatch_token)
            FROM children, (SELECT count(*) FROM history) h
            WHERE claim
            ORDER BY step_id
            RETURNING step_id
        )
        SELECT u.task_id, t.namespace, u.to_status, u.outcome = 'deferred' AS deferred,
               u.queue_latency,
               ARRAY(SELECT step_id FROM dispatched) AS claimed
        FROM updated u JOIN tasks t USING (task_id)
        "#,
    )
    .bind(unique.iter().map(|r| r.step_id).collect::<Vec<_>>())
    .bind(unique.iter().map(|r| r.dispatch_token).collect::<Vec<_>>())
    .bind(unique.iter().map(|r| outcome(r)).collect::<Vec<_>>())
    .bind(
        unique
            .iter()
            .map(|r| r.results.clone().unwrap_or_else(|| json!({})))
            .collect::<Vec<_>>(),
    )
    .bind(unique.iter().map(|r| last_error(r)).collect::<Vec<_>>())
    .bind(
        unique
            .iter()
            .map(|r| r.error.as_ref().and_then(|e| e.retry_after_seconds))
            .collect::<Vec<_>>(),
    )
    .bind(unique.iter().map(|r| r.started_at).collect::<Vec<_>>())
    .bind(unique.iter().map(|r| r.finished_at).collect::<Vec<_>>())
    .bind(unique.iter().map(|r| r.worker_id.clone()).collect::<Vec<_>>())
    .bind(lease_ms)
    .fetch_all(conn)
    .await?;

    // Every row carries the same list of claimed children.
    let claimed = rows
        .first()
        .map(|row| row.claimed.clone())
        .unwrap_or_default();
    let changes: Vec<StepChange> = rows.into_iter().map(|row| row.change).collect();
    let mut tasks: Vec<Uuid> = changes.iter().map(|c| c.task_id).collect();
    tasks.sort_unstable();
    tasks.dedup();
    Ok(AppliedResults {
        retries_scheduled: changes.iter().filter(|c| c.waits_for_retry()).count(),
        applied: changes.len(),
        stale: results.len() - changes.len(),
        tasks,
        changes,
        claimed,
    })
}

/// The `last_error` a failed (or deferred) result leaves on its step.
fn last_error(result: &StepResult) -> Option<Value> {
    let error = result.error.as_ref()?;
    let kind = match (result.outcome, error.code.as_deref()) {
        (Outcome::Deferred, _) => "deferred",
        (_, Some("timeout")) => "timeout",
        (Outcome::PermanentError, _) => "permanent",
        _ => "retryable",
    };
    let mut value = json!({"kind": kind, "message": error.message});
    if let Some(code) = &error.code {
        value["code"] = json!(code);
    }
    Some(value)
}
