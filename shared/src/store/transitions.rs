//! The one door for state changes.
//!
//! Every function here is one batched statement (or a few, inside the caller's
//! transaction) that moves steps or tasks between states with a guard on their current
//! state, and appends a row per change to the transition history. Nothing else in Tasker
//! writes a `status` column.
//!
//! | function | step transition | reason recorded |
//! |---|---|---|
//! | [`claim_ready`] | pending / waiting_for_retry → enqueued | `dispatched` |
//! | [`mark_started`] | enqueued → in_progress | `started` |
//! | [`apply_results`] | enqueued / in_progress → complete / waiting_for_retry / error | `succeeded`, `retry_scheduled`, `failed`, `attempts_exhausted` |
//! | [`expire_leases`] | enqueued → waiting_for_retry; in_progress → waiting_for_retry / error | `lease_lost`, `lease_expired` |
//! | [`finish_tasks`] | task in_progress → complete / error | `all_steps_done`, `blocked_by_failures` |
//!
//! Results are fenced: a result is applied only while the step is `enqueued` or
//! `in_progress` *and* carries the step's current dispatch token. Anything else (late,
//! duplicated, from an expired lease or a cancelled task) is counted as stale and dropped.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::{Outcome, SCHEMA_VERSION, StepMessage, StepResult, StepStarted};
use crate::states::TaskStatus;

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    step_id: Uuid,
    task_id: Uuid,
    name: String,
    handler: String,
    config: Value,
    attempts: i32,
    retry_limit: i32,
    dispatch_token: Uuid,
    timeout_ms: i64,
    namespace: String,
    template: String,
    context: Value,
    parents: Value,
    dispatched_at: DateTime<Utc>,
}

/// Claim up to `limit` ready steps: mark them `enqueued` with a fresh dispatch token and a
/// lease of `lease_ms`, count the attempt, move their tasks to `in_progress`, and return
/// the messages to publish once the caller's transaction commits.
///
/// Ready means: `pending` or `waiting_for_retry`, no unfinished parent, backoff expired,
/// attempts left. Rows locked by another coordinator are skipped, so two coordinators
/// never claim the same step.
pub async fn claim_ready(
    conn: &mut PgConnection,
    limit: i64,
    lease_ms: i64,
) -> sqlx::Result<Vec<StepMessage>> {
    let rows: Vec<ClaimedRow> = sqlx::query_as(
        r#"
        WITH candidates AS (
            SELECT step_id, status AS from_status
            FROM steps
            WHERE status IN ('pending', 'waiting_for_retry')
              AND remaining_parents = 0
              AND (next_attempt_at IS NULL OR next_attempt_at <= now())
              AND attempts < retry_limit
            ORDER BY next_attempt_at NULLS FIRST, created_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        ),
        claimed AS (
            UPDATE steps s
            SET status = 'enqueued',
                attempts = s.attempts + 1,
                dispatch_token = gen_random_uuid(),
                lease_expires_at = now() + $2 * interval '1 millisecond',
                next_attempt_at = NULL,
                enqueued_at = now(),
                updated_at = now()
            FROM candidates c
            WHERE s.step_id = c.step_id
            RETURNING s.step_id, s.task_id, s.name, s.handler, s.config, s.attempts,
                      s.retry_limit, s.dispatch_token, s.timeout_ms, c.from_status
        ),
        step_history AS (
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, from_status, 'enqueued', 'dispatched',
                   jsonb_build_object('attempt', attempts, 'dispatch_token', dispatch_token)
            FROM claimed
        ),
        started_tasks AS (
            UPDATE tasks t SET status = 'in_progress', updated_at = now()
            WHERE t.task_id IN (SELECT task_id FROM claimed) AND t.status = 'pending'
            RETURNING t.task_id
        ),
        task_history AS (
            INSERT INTO task_transitions (task_id, from_status, to_status, reason)
            SELECT task_id, 'pending', 'in_progress', 'first_step_dispatched' FROM started_tasks
        )
        SELECT c.step_id, c.task_id, c.name, c.handler, c.config, c.attempts, c.retry_limit,
               c.dispatch_token, c.timeout_ms, t.namespace, t.name || '@' || t.version AS template,
               t.context,
               COALESCE((SELECT jsonb_object_agg(p.name, COALESCE(p.results, 'null'::jsonb))
                         FROM step_edges e JOIN steps p ON p.step_id = e.from_step
                         WHERE e.to_step = c.step_id), '{}'::jsonb) AS parents,
               now() AS dispatched_at
        FROM claimed c JOIN tasks t ON t.task_id = c.task_id
        "#,
    )
    .bind(limit)
    .bind(lease_ms)
    .fetch_all(conn)
    .await?;

    Ok(rows
        .into_iter()
        .map(|row| StepMessage {
            schema_version: SCHEMA_VERSION,
            task_id: row.task_id,
            step_id: row.step_id,
            step_name: row.name,
            namespace: row.namespace,
            template: row.template,
            handler: row.handler,
            config: row.config,
            context: row.context,
            parents: match row.parents {
                Value::Object(map) => map.into_iter().collect(),
                _ => Default::default(),
            },
            attempt: row.attempts,
            retry_limit: row.retry_limit,
            dispatch_token: row.dispatch_token,
            timeout_ms: row.timeout_ms,
            dispatched_at: row.dispatched_at,
        })
        .collect())
}

/// Mark steps `in_progress` from workers' started notices, extending each lease to the
/// step's timeout plus `grace_ms`. Notices for steps that moved on are ignored.
/// Returns how many steps changed.
pub async fn mark_started(
    conn: &mut PgConnection,
    worker_id: &str,
    started: &[StepStarted],
    grace_ms: i64,
) -> sqlx::Result<u64> {
    if started.is_empty() {
        return Ok(0);
    }
    let result = sqlx::query(
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[])
                AS i(step_id, token, started_at)
        ),
        locked AS (
            SELECT s.step_id, i.started_at
            FROM steps s JOIN input i ON i.step_id = s.step_id AND s.dispatch_token = i.token
            WHERE s.status = 'enqueued'
            ORDER BY s.step_id
            FOR UPDATE OF s
        ),
        moved AS (
            UPDATE steps s
            SET status = 'in_progress',
                started_at = l.started_at,
                lease_expires_at = now() + (s.timeout_ms + $4) * interval '1 millisecond',
                updated_at = now()
            FROM locked l
            WHERE s.step_id = l.step_id
            RETURNING s.step_id, s.task_id, s.attempts
        )
        INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
        SELECT step_id, task_id, 'enqueued', 'in_progress', 'started',
               jsonb_build_object('attempt', attempts, 'worker_id', $5::text)
        FROM moved
        "#,
    )
    .bind(started.iter().map(|s| s.step_id).collect::<Vec<_>>())
    .bind(started.iter().map(|s| s.dispatch_token).collect::<Vec<_>>())
    .bind(started.iter().map(|s| s.started_at).collect::<Vec<_>>())
    .bind(grace_ms)
    .bind(worker_id)
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
    /// Tasks whose steps changed: the caller finishes them with [`finish_tasks`].
    pub tasks: Vec<Uuid>,
}

#[derive(sqlx::FromRow)]
struct AppliedRow {
    task_id: Uuid,
}

/// Apply a batch of results: success completes the step and makes its children one parent
/// closer to ready; a retryable failure schedules the next attempt after the backoff (the
/// handler's `retry_after` when given, capped by the step's maximum); a permanent failure,
/// a non-retryable step or the last attempt failing puts the step in `error`.
pub async fn apply_results(
    conn: &mut PgConnection,
    results: &[StepResult],
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
    };
    let rows: Vec<AppliedRow> = sqlx::query_as(
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[],
                                 $6::float8[], $7::timestamptz[], $8::timestamptz[], $9::text[])
                AS i(step_id, token, outcome, results, error, retry_after, started_at,
                     finished_at, worker_id)
        ),
        current AS (
            SELECT s.step_id, s.status AS from_status, s.attempts, s.retry_limit, s.retryable,
                   s.backoff_base_ms, s.backoff_max_ms, i.outcome, i.results, i.error,
                   i.retry_after, i.started_at, i.finished_at, i.worker_id
            FROM steps s JOIN input i ON i.step_id = s.step_id AND s.dispatch_token = i.token
            WHERE s.status IN ('enqueued', 'in_progress')
            ORDER BY s.step_id
            FOR UPDATE OF s
        ),
        decided AS (
            SELECT c.*,
                   CASE
                       WHEN c.outcome = 'success' THEN 'complete'
                       WHEN c.outcome = 'permanent_error' OR NOT c.retryable
                            OR c.attempts >= c.retry_limit THEN 'error'
                       ELSE 'waiting_for_retry'
                   END AS to_status,
                   CASE
                       WHEN c.retry_after IS NOT NULL
                           THEN least(c.retry_after * 1000, c.backoff_max_ms)
                       ELSE least(c.backoff_base_ms * power(2, greatest(c.attempts - 1, 0)),
                                  c.backoff_max_ms) * (0.5 + random() * 0.5)
                   END AS delay_ms
            FROM current c
        ),
        updated AS (
            UPDATE steps s
            SET status = d.to_status,
                results = CASE WHEN d.to_status = 'complete' THEN d.results ELSE s.results END,
                last_error = CASE WHEN d.to_status = 'complete' THEN NULL ELSE d.error END,
                next_attempt_at = CASE WHEN d.to_status = 'waiting_for_retry'
                                       THEN now() + d.delay_ms * interval '1 millisecond' END,
                started_at = d.started_at,
                completed_at = CASE WHEN d.to_status IN ('complete', 'error')
                                    THEN d.finished_at END,
                lease_expires_at = NULL,
                updated_at = now()
            FROM decided d
            WHERE s.step_id = d.step_id
            RETURNING s.step_id, s.task_id, s.attempts, s.next_attempt_at, d.from_status,
                      d.to_status, d.outcome, d.worker_id, d.finished_at, d.started_at
        ),
        history AS (
            INSERT INTO step_transitions (step_id, task_id, from_status, to_status, reason, metadata)
            SELECT step_id, task_id, from_status, to_status,
                   CASE
                       WHEN to_status = 'complete' THEN 'succeeded'
                       WHEN to_status = 'waiting_for_retry' THEN 'retry_scheduled'
                       WHEN outcome = 'retryable_error' THEN 'attempts_exhausted'
                       ELSE 'failed'
                   END,
                   jsonb_strip_nulls(jsonb_build_object(
                       'attempt', attempts, 'worker_id', worker_id,
                       'duration_ms', round(extract(epoch FROM finished_at - started_at) * 1000),
                       'next_attempt_at', next_attempt_at))
            FROM updated
        ),
        children AS (
            UPDATE steps c
            SET remaining_parents = c.remaining_parents - x.done
            FROM (SELECT e.to_step, count(*)::int AS done
                  FROM step_edges e JOIN updated u ON u.step_id = e.from_step
                  WHERE u.to_status = 'complete'
                  GROUP BY e.to_step) x
            WHERE c.step_id = x.to_step
        )
        SELECT task_id FROM updated
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
    .fetch_all(conn)
    .await?;

    let mut tasks: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
    tasks.sort_unstable();
    tasks.dedup();
    Ok(AppliedResults {
        applied: rows.len(),
        stale: results.len() - rows.len(),
        tasks,
    })
}

/// The `last_error` a failed result leaves on its step.
fn last_error(result: &StepResult) -> Option<Value> {
    let error = result.error.as_ref()?;
    let kind = match (result.outcome, error.code.as_deref()) {
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
pub async fn expire_leases(conn: &mut PgConnection, limit: i64) -> sqlx::Result<ExpiredLeases> {
    let rows: Vec<ExpiredRow> = sqlx::query_as(
        r#"
        WITH expired AS (
            SELECT step_id, status AS from_status
            FROM steps
            WHERE status IN ('enqueued', 'in_progress') AND lease_expires_at < now()
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
                next_attempt_at = CASE
                    WHEN e.from_status = 'enqueued' THEN now()
                    WHEN NOT s.retryable OR s.attempts >= s.retry_limit THEN NULL
                    ELSE now() + least(s.backoff_base_ms * power(2, greatest(s.attempts - 1, 0)),
                                       s.backoff_max_ms) * (0.5 + random() * 0.5)
                                 * interval '1 millisecond'
                END,
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

/// A task that [`finish_tasks`] finished.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FinishedTask {
    /// The task.
    pub task_id: Uuid,
    /// `complete` or `error`.
    pub status: TaskStatus,
}

/// Finish the given tasks that can finish: `complete` when every step is complete or
/// resolved; `error` when a step is in `error` and nothing else can run (no step queued,
/// running, waiting for a retry, or ready).
pub async fn finish_tasks(
    conn: &mut PgConnection,
    tasks: &[Uuid],
) -> sqlx::Result<Vec<FinishedTask>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    // Lock the tasks first, in a statement of its own: when two coordinators apply the
    // last results of one task at once, the second waits here for the first to commit and
    // then counts with a snapshot that includes the first one's steps. Counting in the
    // same statement as the lock would use a snapshot taken before the wait, and neither
    // would see the task as done.
    sqlx::query("SELECT 1 FROM tasks WHERE task_id = ANY($1) ORDER BY task_id FOR UPDATE")
        .bind(tasks)
        .execute(&mut *conn)
        .await?;
    sqlx::query_as(
        r#"
        WITH counts AS (
            SELECT task_id,
                   count(*) AS total,
                   count(*) FILTER (WHERE status IN ('complete', 'resolved_manually')) AS done,
                   count(*) FILTER (WHERE status = 'error') AS failed,
                   count(*) FILTER (WHERE status IN ('enqueued', 'in_progress', 'waiting_for_retry')
                                       OR (status = 'pending' AND remaining_parents = 0)) AS live
            FROM steps
            WHERE task_id = ANY($1)
            GROUP BY task_id
        ),
        outcome AS (
            SELECT task_id,
                   CASE WHEN done = total THEN 'complete'
                        WHEN failed > 0 AND live = 0 THEN 'error'
                   END AS to_status
            FROM counts
        ),
        locked AS (
            SELECT t.task_id, t.status AS from_status, o.to_status
            FROM tasks t JOIN outcome o USING (task_id)
            WHERE o.to_status IS NOT NULL AND t.status IN ('pending', 'in_progress')
        ),
        finished AS (
            UPDATE tasks t
            SET status = l.to_status, completed_at = now(), updated_at = now()
            FROM locked l
            WHERE t.task_id = l.task_id
            RETURNING t.task_id, t.status, l.from_status
        ),
        history AS (
            INSERT INTO task_transitions (task_id, from_status, to_status, reason)
            SELECT task_id, from_status, status,
                   CASE WHEN status = 'complete' THEN 'all_steps_done' ELSE 'blocked_by_failures' END
            FROM finished
        )
        SELECT task_id, status FROM finished
        "#,
    )
    .bind(tasks)
    .fetch_all(conn)
    .await
}
