//! The one door for state changes.
//!
//! Every function here is one batched statement (or a few, inside the caller's
//! transaction) that moves steps or tasks between states with a guard on their current
//! state, and appends a row per change to the transition history. Nothing else in Tasker
//! writes a `status` column.
//!
//! | function | step transition | reason recorded |
//! |---|---|---|
//! | [`claim_ready`], [`claim_children`], task creation | pending / waiting_for_retry → enqueued (one path: `tasker_claim_steps`, see [`claim`]) | `dispatched` |
//! | `conditions::judge` (inside [`claim_ready`] and [`claim_children`]) | pending → skipped / error; pending (condition cleared, then claimed); a `for_each` step: pending (instances created and claimed), pending → complete when they are done; a `tasker.wait` step: pending (waiting), or pending → complete when its signal came before | `condition_false`, `failed` (`expression_error`, `fan_out_too_large`, `results_too_large`), `condition_true`, `fanned_out`, `instances_done`, `waiting_for_signal`, `signal_received` |
//! | [`mark_started`] | enqueued → in_progress (in_progress → in_progress on redelivery: a new attempt, up to `retry_limit` + [`RESTARTS_PAST_RETRY_LIMIT`]; past it, returned as lost for the caller to fail through [`apply_results`]); answers runs withdrawn (step cancelled, or under another dispatch, or ended under it for a redelivered copy) | `started`, `restarted_after_redelivery` |
//! | [`heartbeat`] | none: extends the lease of running steps; answers runs withdrawn, as [`mark_started`] | — |
//! | [`apply_results`] | enqueued / in_progress → complete / waiting_for_retry / error, as [`decide`](crate::decision::decide) says; children made ready are claimed; the `for_each` step of an instance that fails: pending → error | `succeeded`, `retry_scheduled`, `deferred`, `failed`, `not_retryable`, `attempts_exhausted`, `deferral_limit`; `dispatched`; `instance_failed` |
//! | [`expire_leases`] | enqueued → waiting_for_retry; in_progress → waiting_for_retry / error | `lease_lost`, `lease_expired` |
//! | `child_tasks::run` (inside `conditions::judge`) | a `tasker.task` step: pending (its child task created, its first steps claimed), pending → complete when the child completed, pending (the child retried), or pending → error | `child_task_started`, `child_task_done`, `child_task_retried`, `failed` (`child_task_failed`, `child_task_cancelled`, `results_too_large`, `child_task_too_deep`, `child_task_tree_too_large`, `child_task_refused`, `template_not_found`, `invalid_context`, `invalid_config`, `expression_error`) |
//! | [`finish_tasks`] | task in_progress → complete / error; the step that started a finished child judged | `all_steps_done`, `blocked_by_failures` |
//! | [`expire_waits`] | a `tasker.wait` step past its timeout: pending → error | `failed` (`wait_timeout`) |
//! | [`signal`] | a `tasker.wait` step: pending → complete (its children claimed), or keeps the payload until it waits | `signal_received` |
//! | [`expire_deadlines`] | every unfinished step → cancelled; task pending / in_progress → error (the step that started an expired child is judged by [`children_ended`]) | `deadline_exceeded` |
//! | [`children_ended`] | the `tasker.task` steps of children that ended outside [`finish_tasks`]: judged as there | as `child_tasks::run` |
//! | [`children_unheard`] | the `tasker.task` steps still waiting for children that ended in a claim (`cancel_oldest`): judged as there | as `child_tasks::run` |
//! | [`cancel_task`] | every unfinished step → cancelled; task → cancelled, and its unfinished child tasks with it; the step that started it, if a child, judged | `task_cancelled`, `cancelled_by_operator`, `parent_cancelled` |
//! | [`cancel_orphans`] | as [`cancel_task`], for the unfinished children of a task a claim cancelled (`cancel_oldest`) | `task_cancelled`, `parent_cancelled` |
//! | [`retry_task`] | error, and cancelled by the task's deadline → pending (fresh attempt budget; a `tasker.task` step whose child ended, handed to be judged); task error → in_progress, its deadline lifted | `retry_requested` |
//! | [`resolve_step`] | pending / waiting_for_retry / error → resolved_manually; in a task in error, the steps its deadline cancelled → pending as in a retry; task error → in_progress | `resolved_by_operator`; `step_resolved` |
//! | [`resolve_task`] | none; task error → resolved_manually | `resolved_by_operator` |
//!
//! Results are fenced: a result is applied only while the step is `enqueued` or
//! `in_progress` *and* carries the step's current dispatch token. Anything else (late,
//! duplicated, from an expired lease or a cancelled task) is counted as stale and dropped.
//!
//! ## Plans
//!
//! The statements that apply a batch find their steps by primary key only, and check the
//! status after the lookup. The planner must not be offered a status index for them:
//! statistics taken while nothing ran say that almost no step is `enqueued` or
//! `in_progress`, so it read every such step (`steps_leased`, `steps_unfinished`) and
//! filtered them by id, a cost that grows with the backlog it is meant to drain. Edges
//! are followed with one index probe per step (`LATERAL … OFFSET 0`): on tables not yet
//! analyzed the planner guesses that each step has a two-hundredth of all edges, and
//! scanned the whole table instead.
//!
//! A batch's input list is joined with `steps` on the key alone, one probe per row. Nor
//! may the id list be offered beside the join (`s.step_id = ANY ($1)`): the planner,
//! which takes an `unnest` for ten rows, then read the steps once, kept them in a
//! Materialize node and compared every row of the list with all of them, the square of
//! the batch (300 results: 44,850 comparisons). `shared/tests/sql.rs` checks every
//! statement's plan for that shape; the claim function reads its candidates with a
//! lateral probe (migration 0021). A status test beside the key is written so that no
//! index can serve it (`(s.status = 'pending') IS TRUE`): in an empty database, or after
//! an `ANALYZE` taken while nothing was pending, a plain `s.status = 'pending'` made the
//! planner walk every pending step (`steps_unfinished`) at each call, whatever the list.

mod child_tasks;
pub mod claim;
mod conditions;
mod failures;
mod leases;
mod operator;
mod worker;

pub use child_tasks::{max_task_tree, set_max_task_tree};
use claim::claim_children;
pub use claim::{Dispatch, ReadyClaim, claim_ready, next_due};
pub(crate) use claim::{FirstStep, first_step_in, judge_steps};
pub use conditions::{max_fan_out, set_max_fan_out};
pub use leases::{
    ConfirmedStep, ExpiredLeases, confirmed_waiting, expire_leases, record_publish,
    release_lost_queue,
};
pub use operator::{
    Cancelled, OperatorError, Signalled, cancel_orphans, cancel_task, resolve_step, resolve_task,
    retry_task, signal,
};
pub use worker::{
    AppliedResults, Heartbeats, HeldStep, LeasePolicy, LostRun, QueueLatency,
    RESTARTS_PAST_RETRY_LIMIT, Started, StartedSteps, StepChange, apply_results, heartbeat,
    lock_batch, mark_started, wait_for_steps,
};

use sqlx::PgConnection;
use uuid::Uuid;

use crate::states::TaskStatus;

/// A task that [`finish_tasks`] finished.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FinishedTask {
    /// The task.
    pub task_id: Uuid,
    /// Its namespace.
    pub namespace: String,
    /// `complete` or `error`.
    pub status: TaskStatus,
    /// Whether its template limits its tasks (`concurrency`): its finishing frees a slot
    /// of its keys, which the dispatcher offers to a waiting task.
    pub limited: bool,
    /// Whether a `tasker.task` step started it: that step is judged now.
    pub has_parent: bool,
    /// Its template's name.
    pub name: String,
    /// From its creation to its end, in seconds.
    pub seconds: f64,
}

/// What [`finish_tasks`] did.
#[derive(Debug, Default)]
pub struct Finished {
    /// The tasks finished: those asked for that could, and the parent tasks their ends
    /// finished in turn.
    pub tasks: Vec<FinishedTask>,
    /// Steps that finished children made ready, claimed: the caller publishes them once
    /// it committed.
    pub claimed: Vec<Dispatch>,
    /// Steps were left ready for the dispatcher.
    pub more_ready: bool,
}

/// Finish the given tasks that can finish: `complete` when every step is complete or
/// resolved; `error` when a step is in `error` and nothing else can run (no step queued,
/// running, waiting for a retry, waiting for its child task or signal, or ready).
///
/// A finished task that a `tasker.task` step started hands that step back to the
/// coordinator ([`child_tasks`]): with `lease_ms`, it is judged here (completed with the
/// child's results, its child retried, or failed), its children claimed, and its task
/// finished in turn; without (where no finished task can have a parent: a task created
/// with every step skipped), it is left ready for the dispatcher (`more_ready`).
pub async fn finish_tasks(
    conn: &mut PgConnection,
    tasks: &[Uuid],
    lease_ms: Option<i64>,
) -> sqlx::Result<Finished> {
    finish_and_judge(conn, tasks, &[], lease_ms).await
}

/// Judge the `tasker.task` steps whose children, among `ended`, ended other than by
/// [`finish_tasks`] (cancelled, past their deadline), claiming what they make ready
/// with a lease of `lease_ms`, and finish their tasks in turn. The dispatcher could not:
/// a step whose child ran on its last attempt has none left to be offered with.
pub async fn children_ended(
    conn: &mut PgConnection,
    ended: &[Uuid],
    lease_ms: i64,
) -> sqlx::Result<Finished> {
    finish_and_judge(conn, &[], ended, Some(lease_ms)).await
}

/// Whether a claim that cancelled tasks as the oldest of their template's concurrency key
/// left work for [`children_unheard`] or [`cancel_orphans`]: one read, without a
/// transaction, so that a sweep with nothing to do costs one statement.
pub async fn claims_left_children(conn: &mut PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar(child_tasks::LEFT_BY_CLAIMS.as_str())
        .fetch_one(conn)
        .await
}

/// Judge, as [`children_ended`] does, the `tasker.task` steps that still wait for
/// children that ended (up to `limit` children): children a claim cancelled as the oldest
/// of their template's concurrency key (`on_limit: cancel_oldest`), whose end no path
/// handed back. Returns those children, and what judging their steps did.
pub async fn children_unheard(
    conn: &mut PgConnection,
    limit: i64,
    lease_ms: i64,
) -> sqlx::Result<(Vec<Uuid>, Finished)> {
    let ended: Vec<Uuid> = sqlx::query_scalar(child_tasks::UNHEARD.as_str())
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    if ended.is_empty() {
        return Ok((ended, Finished::default()));
    }
    let finished = children_ended(conn, &ended, lease_ms).await?;
    Ok((ended, finished))
}

/// [`finish_tasks`] and [`children_ended`] at once: finish `tasks`, then judge the steps
/// of the children among them and of `ended` (children that ended otherwise), and so on
/// up the parents.
pub async fn finish_and_judge(
    conn: &mut PgConnection,
    tasks: &[Uuid],
    ended: &[Uuid],
    lease_ms: Option<i64>,
) -> sqlx::Result<Finished> {
    let (mut tasks, mut ended) = (tasks.to_vec(), ended.to_vec());
    let mut finished = Finished::default();
    loop {
        let round = finish_round(conn, &tasks).await?;
        ended.extend(
            round
                .iter()
                .filter(|task| task.has_parent)
                .map(|task| task.task_id),
        );
        finished.tasks.extend(round);
        let woken = child_tasks::wake_parents(conn, &ended).await?;
        if woken.is_empty() {
            break;
        }
        let Some(lease_ms) = lease_ms else {
            finished.more_ready = true;
            break;
        };
        // The parents' tasks may finish in turn.
        let judged =
            conditions::judge(conn, woken, lease_ms, claim::FIRST_INSTANCES_CLAIMED).await?;
        finished.claimed.extend(judged.dispatches);
        finished.more_ready |= judged.more_ready;
        tasks = judged.tasks;
        ended.clear();
    }
    Ok(finished)
}

/// [`finish_tasks`] without the parents of finished children.
async fn finish_round(conn: &mut PgConnection, tasks: &[Uuid]) -> sqlx::Result<Vec<FinishedTask>> {
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
    let finished: Vec<FinishedTask> = sqlx::query_as(include_str!("../../../sql/tasks/finish.sql"))
        .bind(tasks)
        .fetch_all(&mut *conn)
        .await?;
    free_slots(
        conn,
        finished.iter().filter(|t| t.limited).map(|t| t.task_id),
    )
    .await?;
    Ok(finished)
}

/// A task [`expire_deadlines`] ended.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExpiredTask {
    /// The task.
    pub task_id: Uuid,
    /// Its namespace.
    pub namespace: String,
    /// Its template's name.
    pub name: String,
    /// From its creation to its end, in seconds.
    pub seconds: f64,
    /// Whether its template limits its tasks (`concurrency`): its slots were freed.
    pub limited: bool,
    /// Its steps that were queued or running, each with its dispatch token: workers
    /// should drop those dispatches.
    #[sqlx(skip)]
    pub running: Vec<(Uuid, Uuid)>,
}

/// End up to `limit` unfinished tasks past their deadline: `error` with the reason
/// `deadline_exceeded`, their unfinished steps `cancelled`. Rows another coordinator
/// holds are left to it. The steps that started those of them that are child tasks are
/// for [`children_ended`] to judge.
pub async fn expire_deadlines(
    conn: &mut PgConnection,
    limit: i64,
) -> sqlx::Result<Vec<ExpiredTask>> {
    let mut expired: Vec<ExpiredTask> =
        sqlx::query_as(include_str!("../../../sql/tasks/expire_deadlines.sql"))
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
    if expired.is_empty() {
        return Ok(expired);
    }
    // Twice, as a cancel does: the first statement waits for the transactions that hold
    // the tasks' steps (a result being applied) and then sees only the rows its snapshot
    // had, not those they added (a fan-out's instances, which the claim would then
    // dispatch). The second sees them, and later transactions wait for this one's locks.
    let tasks: Vec<Uuid> = expired.iter().map(|task| task.task_id).collect();
    for _ in 0..2 {
        let cancelled: Vec<(Uuid, Uuid, Option<Uuid>)> =
            sqlx::query_as(include_str!("../../../sql/tasks/expire_deadline_steps.sql"))
                .bind(&tasks)
                .fetch_all(&mut *conn)
                .await?;
        for (step_id, task_id, token) in cancelled {
            if let (Some(task), Some(token)) = (
                expired.iter_mut().find(|task| task.task_id == task_id),
                token,
            ) {
                task.running.push((step_id, token));
            }
        }
    }
    free_slots(
        conn,
        expired.iter().filter(|t| t.limited).map(|t| t.task_id),
    )
    .await?;
    Ok(expired)
}

/// Fail up to `limit` `tasker.wait` steps whose timeout passed without their signal
/// (`wait_timeout`); their clean-up and compensation children are left ready for the
/// dispatcher. Rows another coordinator holds are left to it. Returns their tasks, to
/// finish.
pub async fn expire_waits(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<Uuid>> {
    let failed: Vec<(Uuid, Uuid)> = sqlx::query_as(include_str!("../../../sql/waits/expire.sql"))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    let steps: Vec<Uuid> = failed.iter().map(|(step, _)| *step).collect();
    failures::failed(conn, &steps).await?;
    let mut tasks: Vec<Uuid> = failed.into_iter().map(|(_, task)| task).collect();
    tasks.sort_unstable();
    tasks.dedup();
    Ok(tasks)
}

/// Give back the template-concurrency slots of `tasks`, ended tasks of limited templates
/// (a statement only when there are some).
async fn free_slots(
    conn: &mut PgConnection,
    tasks: impl Iterator<Item = Uuid>,
) -> sqlx::Result<()> {
    let tasks: Vec<Uuid> = tasks.collect();
    if !tasks.is_empty() {
        sqlx::query(include_str!("../../../sql/tasks/free_slots.sql"))
            .bind(&tasks)
            .execute(conn)
            .await?;
    }
    Ok(())
}
