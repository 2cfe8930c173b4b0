//! Claiming steps for dispatch: the one claim path.
//!
//! Every claim goes through `tasker_claim_steps` (migrations/0013, last changed in 0027),
//! whatever found the steps: the dispatcher's scan of ready steps and of steps held by a
//! limit ([`claim_ready`]), the children a batch of results completed and the held steps
//! of the keys it freed ([`claim_children`]), a new task's first steps (claimed inside
//! `tasker_create_tasks`, read back with [`first_step_in`]). The function applies the
//! claim rule (`tasker_step_claimable`) and the limits (holding the steps that do not
//! fit), writes the `dispatched` history rows, starts the tasks and returns each claimed
//! step's message. A new condition on claiming goes there.
//!
//! A step with a condition (a `when`, or one the coordinator runs: `for_each`,
//! `tasker.wait`, `tasker.task`) is not claimed but returned without a dispatch token,
//! once it passed what a claim of it would (its task's start, under its template's
//! `concurrency`): each function here has it judged in the same transaction
//! ([`super::conditions`]), and returns the steps that claims.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use super::conditions::Judged;
use crate::messages::{SCHEMA_VERSION, StepMessage};

/// A row of `tasker_claim_steps`: a claimed step's message, or (without a dispatch
/// token, the rest empty) a step whose condition is to be judged.
#[derive(sqlx::FromRow)]
pub(super) struct ClaimedRow {
    step_id: Uuid,
    task_id: Uuid,
    name: String,
    handler: Option<String>,
    config: Option<Value>,
    attempts: Option<i32>,
    retry_limit: Option<i32>,
    deferrals: Option<i32>,
    dispatch_token: Option<Uuid>,
    timeout_ms: Option<i64>,
    namespace: Option<String>,
    template: Option<String>,
    context: Option<Value>,
    parents: Option<Value>,
    dispatched_at: Option<DateTime<Utc>>,
    trace_parent: Option<String>,
}

/// The claimed steps of a claim's rows, and the steps whose condition is to be judged.
pub(super) fn split(rows: Vec<ClaimedRow>) -> (Vec<Dispatch>, Vec<Uuid>) {
    let mut dispatches = Vec::with_capacity(rows.len());
    let mut to_judge = Vec::new();
    for row in rows {
        match row.dispatch_token {
            Some(token) => dispatches.push(row.into_dispatch(token)),
            None => to_judge.push(row.step_id),
        }
    }
    (dispatches, to_judge)
}

/// A claimed step, ready to publish.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The message for the worker.
    pub message: StepMessage,
    /// The task's trace (W3C traceparent), when traces are on: the dispatch span's parent.
    pub trace_parent: Option<String>,
}

/// What [`claim_ready`] did: the steps it claimed, and the tasks that judging steps (a
/// `when`, a finished fan-out) finished, for the caller to count.
#[derive(Debug, Default)]
pub struct ReadyClaim {
    /// To publish once the caller's transaction commits.
    pub dispatches: Vec<Dispatch>,
    /// Finished by steps judged.
    pub finished: Vec<super::FinishedTask>,
}

/// Claim up to `limit` ready steps, best first, with a lease of `lease_ms`, and the held
/// steps that may fit again: rate-held steps whose slot came (up to `limit` per key), the
/// first steps of tasks waiting for a template concurrency key with room, and, with
/// `every_key`, the held steps of every concurrency key with a free slot (up to `limit`
/// keys). Results release their keys' held steps themselves; `every_key` is for slots
/// freed otherwise (an expired lease, a cancelled task). Returns the messages to publish
/// once the caller's transaction commits, and the tasks finished. Rows locked by another
/// coordinator are skipped, so two coordinators never claim the same step.
pub async fn claim_ready(
    conn: &mut PgConnection,
    limit: i64,
    lease_ms: i64,
    every_key: bool,
) -> sqlx::Result<ReadyClaim> {
    let rows: Vec<ClaimedRow> = sqlx::query_as(include_str!("../../../sql/claim/ready.sql"))
        .bind(limit)
        .bind(lease_ms)
        .bind(every_key)
        .fetch_all(&mut *conn)
        .await?;
    let (mut dispatches, to_judge) = split(rows);
    with_items(&mut *conn, &mut dispatches).await?;
    let mut finished_tasks = Vec::new();
    if !to_judge.is_empty() {
        // Judged in a transaction of their own (the claim above has committed): a step
        // skipped counts for its children in the same one, and its task may finish.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        // A fan-out claims at most one batch of its instances here: a full batch keeps
        // the dispatcher claiming, and the rest are ready steps.
        let judged = super::conditions::judge(&mut tx, to_judge, lease_ms, limit as usize).await?;
        let finished = super::finish_tasks(&mut tx, &judged.tasks, Some(lease_ms)).await?;
        tx.commit().await?;
        dispatches.extend(judged.dispatches);
        dispatches.extend(finished.claimed);
        finished_tasks = finished.tasks;
        // Steps left ready (a retried child task's): claimed now, while there is room.
        let room = limit - dispatches.len() as i64;
        if (judged.more_ready || finished.more_ready) && room > 0 {
            let more = Box::pin(claim_ready(conn, room, lease_ms, false)).await?;
            dispatches.extend(more.dispatches);
            finished_tasks.extend(more.finished);
        }
    }
    Ok(ReadyClaim {
        dispatches,
        finished: finished_tasks,
    })
}

/// How many of a fan-out's instances the transaction that expands it claims, outside the
/// dispatcher (one dispatcher batch by default); the rest are ready steps, and the caller
/// wakes the dispatcher for them.
pub(super) const FIRST_INSTANCES_CLAIMED: usize = 256;

/// Judge the steps `step_ids`, which wait for their condition or fan out (a new task's
/// first `for_each` steps), in a transaction of their own, and finish the tasks that
/// judging finished. Returns the claimed steps (of a fan-out, the first
/// [`FIRST_INSTANCES_CLAIMED`]; the caller wakes the dispatcher for the rest).
pub(crate) async fn judge_steps(
    pool: &sqlx::PgPool,
    step_ids: Vec<Uuid>,
    lease_ms: i64,
) -> sqlx::Result<Vec<Dispatch>> {
    let mut tx = pool.begin().await?;
    let judged =
        super::conditions::judge(&mut tx, step_ids, lease_ms, FIRST_INSTANCES_CLAIMED).await?;
    let finished = super::finish_tasks(&mut tx, &judged.tasks, Some(lease_ms)).await?;
    tx.commit().await?;
    let mut dispatches = judged.dispatches;
    dispatches.extend(finished.claimed);
    Ok(dispatches)
}

/// Count the completion of `completed` steps against their children, and claim each
/// child whose last parent this was, and the held steps of `freed` concurrency keys (a
/// step of each finished) that now fit. `keyed`: `Some(false)` when no template of the
/// completed steps has limits, which spares the claim's look for keys (a child with one
/// all the same is left for the dispatcher); `None` when not known. The caller holds the
/// children's rows ([`lock_batch`](super::lock_batch)). Answers the claimed steps, the
/// tasks judging may have finished (a child task started with every step skipped, say:
/// the caller finishes them with its own), and whether steps were left ready for the
/// dispatcher (a fan-out's instances past [`FIRST_INSTANCES_CLAIMED`]).
pub(super) async fn claim_children(
    conn: &mut PgConnection,
    completed: &[Uuid],
    freed: &[String],
    keyed: Option<bool>,
    lease_ms: i64,
) -> sqlx::Result<Judged> {
    let (dispatches, to_judge) = children_rows(conn, completed, freed, keyed, lease_ms).await?;
    judge_after(conn, dispatches, to_judge, lease_ms).await
}

/// Judge `to_judge`, steps a claim handed over (a fan-out's first
/// [`FIRST_INSTANCES_CLAIMED`] instances claimed), after the `claimed` ones: what judging
/// did, those first among its dispatches.
pub(super) async fn judge_after(
    conn: &mut PgConnection,
    claimed: Vec<Dispatch>,
    to_judge: Vec<Uuid>,
    lease_ms: i64,
) -> sqlx::Result<Judged> {
    let mut judged =
        super::conditions::judge(conn, to_judge, lease_ms, FIRST_INSTANCES_CLAIMED).await?;
    judged.dispatches.splice(0..0, claimed);
    Ok(judged)
}

/// [`claim_children`] without judging conditions: the claimed steps and those to judge.
pub(super) async fn children_rows(
    conn: &mut PgConnection,
    completed: &[Uuid],
    freed: &[String],
    keyed: Option<bool>,
    lease_ms: i64,
) -> sqlx::Result<(Vec<Dispatch>, Vec<Uuid>)> {
    if completed.is_empty() && freed.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let rows: Vec<ClaimedRow> = sqlx::query_as(include_str!("../../../sql/claim/children.sql"))
        .bind(completed)
        .bind(lease_ms)
        .bind(freed)
        .bind(keyed)
        .fetch_all(&mut *conn)
        .await?;
    let (mut dispatches, to_judge) = split(rows);
    with_items(conn, &mut dispatches).await?;
    Ok((dispatches, to_judge))
}

/// Lock the children of `parents`, steps done in the caller's transaction by something
/// else than a result (judged, skipped, signalled), before [`children_rows`] counts them:
/// the claim counts a child's parents from the row as it read it, and a transaction
/// that counted another parent of the child meanwhile (another result batch) would have
/// its count overwritten, leaving the child waiting for a parent that is done. The result
/// path locks its results' children up front ([`lock_batch`](super::lock_batch)), not
/// those of the steps it then judges. Waiting here can deadlock with another batch doing
/// the same; PostgreSQL then fails one transaction, which its caller applies again.
pub(super) async fn lock_children(conn: &mut PgConnection, parents: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query(include_str!("../../../sql/claim/lock_children.sql"))
        .bind(parents)
        .execute(conn)
        .await?;
    Ok(())
}

/// Claim the steps `step_ids` (whose conditions held) through the one claim.
pub(super) async fn claim_steps(
    conn: &mut PgConnection,
    step_ids: &[Uuid],
    lease_ms: i64,
) -> sqlx::Result<(Vec<Dispatch>, Vec<Uuid>)> {
    let rows: Vec<ClaimedRow> =
        sqlx::query_as("SELECT * FROM tasker_claim_steps($1, NULL, $2, NULL)")
            .bind(step_ids)
            .bind(lease_ms)
            .fetch_all(&mut *conn)
            .await?;
    let (mut dispatches, to_judge) = split(rows);
    with_items(conn, &mut dispatches).await?;
    Ok((dispatches, to_judge))
}

/// Give the instances of `for_each` steps among `dispatches` their element and index.
/// An instance is known by its name (`<step>[<index>]`: a template's step names have no
/// bracket), so a claim without one asks nothing more.
async fn with_items(conn: &mut PgConnection, dispatches: &mut [Dispatch]) -> sqlx::Result<()> {
    let instances: Vec<Uuid> = dispatches
        .iter()
        .filter(|dispatch| dispatch.message.step_name.ends_with(']'))
        .map(|dispatch| dispatch.message.step_id)
        .collect();
    if instances.is_empty() {
        return Ok(());
    }
    let rows: Vec<(Uuid, Option<Value>, Option<i32>)> =
        sqlx::query_as(include_str!("../../../sql/fan_out/items.sql"))
            .bind(&instances)
            .fetch_all(conn)
            .await?;
    let items: std::collections::HashMap<Uuid, (Option<Value>, Option<i32>)> = rows
        .into_iter()
        .map(|(step_id, item, index)| (step_id, (item, index)))
        .collect();
    for dispatch in dispatches {
        if let Some((item, index)) = items.get(&dispatch.message.step_id) {
            dispatch.message.item.clone_from(item);
            dispatch.message.index = *index;
        }
    }
    Ok(())
}

/// What the claim in a creation did with one of a created task's first steps.
pub(crate) enum FirstStep {
    /// Claimed: its message, to publish.
    Claimed(Box<Dispatch>),
    /// A step the coordinator runs (`for_each`, `tasker.wait`, `tasker.task`), handed back
    /// to be judged: its task started, as a claim of it would have started it. (A step
    /// whose task waits for a key of its template's concurrency, or was cancelled by it,
    /// is not handed back.)
    ToJudge(Uuid),
}

/// The first step in a row of `tasker_create_tasks`, which returns a created task's
/// first steps as `tasker_claim_steps` returned them (none: `step_id` is NULL).
pub(crate) fn first_step_in(row: &PgRow) -> sqlx::Result<Option<FirstStep>> {
    match row.try_get::<Option<Uuid>, _>("dispatch_token")? {
        Some(token) => ClaimedRow::from_row(row)
            .map(|row| Some(FirstStep::Claimed(Box::new(row.into_dispatch(token))))),
        None => Ok(row
            .try_get::<Option<Uuid>, _>("step_id")?
            .map(FirstStep::ToJudge)),
    }
}

impl ClaimedRow {
    /// The message of a claimed step (the claim fills every column of one).
    fn into_dispatch(self, dispatch_token: Uuid) -> Dispatch {
        Dispatch {
            trace_parent: self.trace_parent,
            message: StepMessage {
                schema_version: SCHEMA_VERSION,
                task_id: self.task_id,
                step_id: self.step_id,
                step_name: self.name,
                namespace: self.namespace.unwrap_or_default(),
                template: self.template.unwrap_or_default(),
                handler: self.handler.unwrap_or_default(),
                config: self.config.unwrap_or_default(),
                context: self.context.unwrap_or_default(),
                parents: match self.parents {
                    Some(Value::Object(map)) => map.into_iter().collect(),
                    _ => Default::default(),
                },
                attempt: self.attempts.unwrap_or_default(),
                retry_limit: self.retry_limit.unwrap_or_default(),
                deferrals: self.deferrals.unwrap_or_default(),
                dispatch_token,
                timeout_ms: self.timeout_ms.unwrap_or_default(),
                dispatched_at: self.dispatched_at.unwrap_or_default(),
                item: None,
                index: None,
            },
        }
    }
}

/// When the next step in backoff becomes (or became) ready, if any: the dispatcher sleeps
/// until then rather than polling. A time in the past is returned too: the step fell due
/// after the dispatcher's last claim looked, and must not wait for the next poll.
pub async fn next_due(conn: &mut PgConnection) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(include_str!("../../../sql/claim/next_due.sql"))
        .fetch_one(conn)
        .await
}
