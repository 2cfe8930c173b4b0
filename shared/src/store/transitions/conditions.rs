//! Judging `when` conditions: the steps a claim returned without claiming them because
//! their condition waits ([`super::claim`]).
//!
//! Each is evaluated with its task's context and description and its parents' results
//! (a skipped parent absent), in the caller's transaction: true clears the condition and
//! claims the step through the one claim (limits included); false skips it (history
//! `condition_false`) and counts it done for its children, which may be claimed or
//! judged in turn; an expression that fails, or gives no boolean, fails the step
//! permanently with the code `expression_error`.
//!
//! A `for_each` step comes here too (its condition is its `when`, else `true`): once its
//! condition holds, its list is evaluated and the step expanded into one instance per
//! element (`fan_out/expand.sql`), of which the first `claim_first` are claimed at once
//! and the rest left ready for the dispatcher (`more_ready`), so a large fan-out is
//! published while it is still being claimed; a list longer than
//! [`max_fan_out`] fails it (`fan_out_too_large`). It comes back when its last instance
//! is done, and completes with their results in element order (`fan_out/gather.sql`),
//! which counts for its children in turn; an empty list completes it at once. Results
//! larger together than its dependents' messages may carry (`TASKER_MAX_STEP_MESSAGE_BYTES`)
//! fail it (`results_too_large`).
//!
//! A `trigger: one_failed` step comes here too: when none of its parents failed, it is
//! skipped (history `trigger_not_met`) without its condition being evaluated.
//!
//! A `tasker.wait` step comes here the same way; once its condition holds it starts
//! waiting for its signal (`waits/start.sql`), or completes at once when the signal came
//! before.
//!
//! A `tasker.task` step too: once its condition holds it starts its child task, and it
//! comes back when the child ends ([`super::child_tasks`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use chrono::{DateTime, Utc};

use super::Dispatch;
use super::child_tasks::{self, ChildStep};
use super::claim::{children_rows, claim_steps, lock_children};
use crate::states::TaskStatus;
use crate::template::{
    TASK_HANDLER, WAIT_HANDLER, evaluate_condition, evaluate_list, task_variable, wait_timeout_ms,
};

/// How many child tasks one transaction starts before it leaves their first steps to the
/// dispatcher ([`judge`]).
const MAX_CHILDREN_JUDGED: usize = 256;

/// The most elements a `for_each` list may have unless set otherwise (the coordinator's
/// `TASKER_MAX_FAN_OUT`).
static MAX_FAN_OUT: AtomicUsize = AtomicUsize::new(10_000);

/// The most elements a `for_each` list may have; a longer one fails its step with
/// `fan_out_too_large`.
pub fn max_fan_out() -> usize {
    MAX_FAN_OUT.load(Ordering::Relaxed)
}

/// Set [`max_fan_out`] for this process (the coordinator's `TASKER_MAX_FAN_OUT`).
pub fn set_max_fan_out(max: usize) {
    MAX_FAN_OUT.store(max, Ordering::Relaxed);
}

/// A step waiting for its condition, with what the condition sees.
#[derive(sqlx::FromRow)]
struct Pending {
    step_id: Uuid,
    task_id: Uuid,
    step_name: String,
    condition: String,
    context: Value,
    namespace: String,
    name: String,
    version: String,
    priority: i16,
    tags: Value,
    trace_parent: Option<String>,
    deadline_at: Option<DateTime<Utc>>,
    /// How far below its root its task is (0: not a child task).
    depth: i16,
    /// Its task's root task (its task itself when not a child task).
    root_task_id: Uuid,
    handler: String,
    config: Value,
    /// A `tasker.task` step's child, once started, and the child's status.
    child_task_id: Option<Uuid>,
    child_status: Option<TaskStatus>,
    attempts: i32,
    retry_limit: i32,
    retryable: bool,
    /// The step's instances, once expanded (`for_each`).
    instances: Option<i32>,
    for_each: Option<String>,
    max_parallel: Option<i32>,
    /// Its `trigger` (NULL: `all_success`), and whether a parent ended in `error`.
    trigger: Option<String>,
    parent_failed: bool,
    /// NULL once the step is expanded.
    parents: Option<Value>,
}

/// What judging did.
#[derive(Debug, Default)]
pub(super) struct Judged {
    /// Steps claimed: their conditions held, or a skipped step was their last parent.
    pub(super) dispatches: Vec<Dispatch>,
    /// Tasks with a step skipped or failed: they may have finished.
    pub(super) tasks: Vec<Uuid>,
    /// Instances were left ready, unclaimed: the dispatcher is to claim them.
    pub(super) more_ready: bool,
}

/// Judge the conditions of the steps `to_judge`, and of the steps their skipping makes
/// ready, claiming those that run (lease of `lease_ms`), and of a fan-out's instances
/// the first `claim_first`.
pub(super) async fn judge(
    conn: &mut PgConnection,
    mut to_judge: Vec<Uuid>,
    lease_ms: i64,
    claim_first: usize,
) -> sqlx::Result<Judged> {
    let mut judged = Judged::default();
    let mut children_started = 0;
    while !to_judge.is_empty() {
        let pending: Vec<Pending> =
            sqlx::query_as(include_str!("../../../sql/conditions/pending.sql"))
                .bind(&to_judge)
                .fetch_all(&mut *conn)
                .await?;
        let mut settle = Settle::default();
        let mut expand = Expand::default();
        let mut gather = Vec::new();
        let mut waits: (Vec<Uuid>, Vec<Option<i64>>) = Default::default();
        let mut children = Vec::new();
        // Fan-ins and waits completed here: they count for their children.
        let mut completed = Vec::new();
        let no_parents = Value::Object(Default::default());
        for step in &pending {
            if step.instances.is_some() {
                // Expanded, and its last instance is done.
                gather.push(step.step_id);
                continue;
            }
            if step.trigger.as_deref() == Some("one_failed") && !step.parent_failed {
                // A compensation whose parents all succeeded: not run.
                settle.untriggered(step.step_id);
                continue;
            }
            let parents = step.parents.as_ref().unwrap_or(&no_parents);
            let task = task_variable(
                &step.namespace,
                &step.name,
                &step.version,
                step.priority,
                &step.tags,
            );
            let outcome = match evaluate_condition(&step.condition, &step.context, parents, &task) {
                Ok(true) if step.handler == WAIT_HANDLER => {
                    waits.0.push(step.step_id);
                    waits.1.push(wait_timeout_ms(&step.config));
                    continue;
                }
                Ok(true) if step.handler == TASK_HANDLER => {
                    children.push(ChildStep {
                        step_id: step.step_id,
                        task_id: step.task_id,
                        step_name: step.step_name.clone(),
                        config: step.config.clone(),
                        context: step.context.clone(),
                        parents: parents.clone(),
                        task,
                        priority: step.priority,
                        trace_parent: step.trace_parent.clone(),
                        deadline_at: step.deadline_at,
                        depth: step.depth,
                        root: step.root_task_id,
                        child: step.child_task_id.zip(step.child_status),
                        attempts: step.attempts,
                        retry_limit: step.retry_limit,
                        retryable: step.retryable,
                    });
                    continue;
                }
                Ok(true) => match &step.for_each {
                    None => Ok(true),
                    Some(list) => match evaluate_list(list, &step.context, parents, &task) {
                        Ok(items) if items.len() > max_fan_out() => Err((
                            "fan_out_too_large",
                            format!(
                                "`{list}` gave {} elements; at most {} may fan out (TASKER_MAX_FAN_OUT)",
                                items.len(),
                                max_fan_out()
                            ),
                        )),
                        Ok(items) => {
                            expand.push(step.step_id, items, step.max_parallel);
                            continue;
                        }
                        Err(error) => Err(("expression_error", error)),
                    },
                },
                Ok(false) => Ok(false),
                Err(error) => Err(("expression_error", error)),
            };
            tracing::debug!(step_id = %step.step_id, task_id = %step.task_id, ?outcome,
                "condition judged");
            settle.push(step.step_id, outcome);
        }
        to_judge = Vec::new();
        if !children.is_empty() {
            let ran = child_tasks::run(&mut *conn, children, lease_ms).await?;
            judged.dispatches.extend(ran.dispatches);
            judged.tasks.extend(ran.tasks);
            judged.more_ready |= ran.more_ready;
            to_judge.extend(ran.to_judge);
            // The new children's first steps the coordinator runs (a `tasker.task` among
            // them starts a grandchild, and so on): judged here up to a bound, so that a
            // transaction stays short however wide the tree; past it, left ready for the
            // dispatcher, which judges them in transactions of their own.
            children_started += ran.started;
            if children_started <= MAX_CHILDREN_JUDGED {
                to_judge.extend(ran.first_steps);
            } else {
                judged.more_ready |= !ran.first_steps.is_empty();
            }
            completed.extend(ran.completed);
            for (step_id, code, message) in ran.failed {
                settle.push(step_id, Err((code, message)));
            }
        }
        if !expand.step_ids.is_empty() {
            let instances: Vec<Uuid> =
                sqlx::query_scalar(include_str!("../../../sql/fan_out/expand.sql"))
                    .bind(&expand.step_ids)
                    .bind(&expand.items)
                    .bind(&expand.max_parallel)
                    .fetch_all(&mut *conn)
                    .await?;
            tracing::debug!(
                steps = expand.step_ids.len(),
                instances = instances.len(),
                "fanned out"
            );
            let first = &instances[..instances.len().min(claim_first)];
            if !first.is_empty() {
                let (dispatches, _) = claim_steps(&mut *conn, first, lease_ms).await?;
                judged.dispatches.extend(dispatches);
            }
            judged.more_ready |= instances.len() > first.len();
            // An empty list: complete at once.
            gather.extend(
                expand
                    .step_ids
                    .iter()
                    .zip(&expand.items)
                    .filter(|(_, items)| items.as_array().is_some_and(Vec::is_empty))
                    .map(|(step, _)| *step),
            );
        }
        if !waits.0.is_empty() {
            let started: Vec<(Uuid, Uuid, bool)> =
                sqlx::query_as(include_str!("../../../sql/waits/start.sql"))
                    .bind(&waits.0)
                    .bind(&waits.1)
                    .fetch_all(&mut *conn)
                    .await?;
            // A signal that came before it waited: complete at once.
            for (step_id, task_id, done) in started {
                if done {
                    completed.push(step_id);
                    judged.tasks.push(task_id);
                }
            }
        }
        if !gather.is_empty() {
            let Completed {
                completed: gathered,
                too_large,
            } = complete_within_limits(
                &mut *conn,
                include_str!("../../../sql/fan_out/gather.sql"),
                &gather,
            )
            .await?;
            for (step_id, task_id) in gathered {
                completed.push(step_id);
                // A task whose last step this was may finish.
                judged.tasks.push(task_id);
            }
            for (step_id, size) in too_large {
                settle.push(
                    step_id,
                    Err((
                        RESULTS_TOO_LARGE,
                        results_too_large("its instances' results", size),
                    )),
                );
            }
        }
        if !completed.is_empty() {
            lock_children(&mut *conn, &completed).await?;
            let (dispatches, next) =
                children_rows(&mut *conn, &completed, &[], None, lease_ms).await?;
            judged.dispatches.extend(dispatches);
            to_judge.extend(next);
        }
        if settle.ids.is_empty() {
            continue;
        }
        let settled: Vec<(Uuid, Uuid, String)> =
            sqlx::query_as(include_str!("../../../sql/conditions/settle.sql"))
                .bind(&settle.ids)
                .bind(&settle.outcomes)
                .bind(&settle.messages)
                .bind(&settle.codes)
                .fetch_all(&mut *conn)
                .await?;
        let held: Vec<Uuid> = settled
            .iter()
            .filter(|(_, _, outcome)| outcome == "true")
            .map(|(step, _, _)| *step)
            .collect();
        let skipped: Vec<Uuid> = settled
            .iter()
            .filter(|(_, _, outcome)| outcome == "false" || outcome == "untriggered")
            .map(|(step, _, _)| *step)
            .collect();
        let errors: Vec<Uuid> = settled
            .iter()
            .filter(|(_, _, outcome)| outcome == "error")
            .map(|(step, _, _)| *step)
            .collect();
        // A step failed here counts for its clean-up and compensation children, which are
        // claimed (or judged) below.
        let mut held_too = super::failures::failed(&mut *conn, &errors).await?;
        judged.tasks.extend(
            settled
                .iter()
                .filter(|(_, _, outcome)| outcome != "true")
                .map(|(_, task, _)| *task),
        );
        held_too.extend(held);
        if !held_too.is_empty() {
            let (dispatches, next) = claim_steps(&mut *conn, &held_too, lease_ms).await?;
            judged.dispatches.extend(dispatches);
            to_judge.extend(next);
        }
        if !skipped.is_empty() {
            lock_children(&mut *conn, &skipped).await?;
            let (dispatches, next) =
                children_rows(&mut *conn, &skipped, &[], None, lease_ms).await?;
            judged.dispatches.extend(dispatches);
            to_judge.extend(next);
        }
    }
    judged.tasks.sort_unstable();
    judged.tasks.dedup();
    Ok(judged)
}

/// The code that fails a step completed with the results of others (a `for_each` step
/// with its instances', a `tasker.task` step with its child's) when those are larger
/// together than its dependents' messages may carry, or than PostgreSQL stores in one
/// value.
pub(super) const RESULTS_TOO_LARGE: &str = "results_too_large";

/// Why the results `whose` fail their step: `(size, max)`, `size` bytes of JSON
/// together, more than the `max` its connection's [`crate::db::MAX_GATHERED_BYTES`] allows
/// (the coordinator's `TASKER_MAX_STEP_MESSAGE_BYTES`); `None`, more than PostgreSQL stores
/// in one value.
pub(super) fn results_too_large(whose: &str, size: Option<(i64, i64)>) -> String {
    match size {
        Some((size, max)) => format!(
            "{whose} are about {size} bytes of JSON together (as PostgreSQL prints it), more \
             than the step's dependents' messages may carry (TASKER_MAX_STEP_MESSAGE_BYTES = \
             {max}): return less from each step, or store the data elsewhere and return where"
        ),
        None => format!(
            "{whose} together are larger than PostgreSQL stores in one value (256 MiB of \
             jsonb): return less from each step, or store the data elsewhere and return where"
        ),
    }
}

/// Run `sql`, a statement that completes the steps `$1` with results it aggregates from
/// other steps' (`fan_out/gather.sql`, `child_tasks/done.sql`) when they are at most
/// [`crate::db::MAX_GATHERED_BYTES`] of JSON, returning each step it completed with its
/// task, then each step it left for being larger with that size and the limit. Returns
/// the steps completed and those to fail ([`Completed`]). Each try runs in a savepoint, so
/// that a refusal leaves the caller's transaction, and the other steps, whole.
pub(super) async fn complete_within_limits(
    conn: &mut PgConnection,
    sql: &'static str,
    steps: &[Uuid],
) -> sqlx::Result<Completed> {
    let mut outcome = Completed::default();
    match complete_in_savepoint(&mut *conn, sql, steps, &mut outcome).await {
        Ok(()) => return Ok(outcome),
        Err(error) if !beyond_limits(&error) => return Err(error),
        Err(_) if steps.len() == 1 => {
            outcome.too_large.push((steps[0], None));
            return Ok(outcome);
        }
        Err(_) => {}
    }
    for step in steps {
        match complete_in_savepoint(&mut *conn, sql, std::slice::from_ref(step), &mut outcome).await
        {
            Ok(()) => {}
            Err(error) if beyond_limits(&error) => outcome.too_large.push((*step, None)),
            Err(error) => return Err(error),
        }
    }
    Ok(outcome)
}

/// What [`complete_within_limits`] did.
#[derive(Default)]
pub(super) struct Completed {
    /// The steps completed, each with its task.
    pub(super) completed: Vec<(Uuid, Uuid)>,
    /// The steps to fail for their results' size, each with that size and the limit
    /// (`None`: PostgreSQL refused them as too large for one value, past jsonb's 256 MiB).
    pub(super) too_large: Vec<(Uuid, Option<(i64, i64)>)>,
}

/// A row of [`complete_within_limits`]'s statement: a step completed, with its task, or
/// one left for its results' size, with that size and the limit.
#[derive(sqlx::FromRow)]
struct Completion {
    step_id: Uuid,
    task_id: Option<Uuid>,
    size: Option<i64>,
    max: Option<i64>,
}

/// [`complete_within_limits`]'s statement, once, in a savepoint: what it did goes to
/// `outcome` once it committed.
async fn complete_in_savepoint(
    conn: &mut PgConnection,
    sql: &'static str,
    steps: &[Uuid],
    outcome: &mut Completed,
) -> sqlx::Result<()> {
    let mut savepoint = conn.begin().await?;
    let rows: sqlx::Result<Vec<Completion>> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(steps)
        .fetch_all(&mut *savepoint)
        .await;
    match rows {
        Ok(rows) => {
            savepoint.commit().await?;
            for row in rows {
                match row.task_id {
                    Some(task) => outcome.completed.push((row.step_id, task)),
                    None => outcome.too_large.push((row.step_id, row.size.zip(row.max))),
                }
            }
            Ok(())
        }
        Err(error) => {
            savepoint.rollback().await?;
            Err(error)
        }
    }
}

/// Whether PostgreSQL refused a statement for exceeding one of its limits (SQLSTATE
/// 54000, `program_limit_exceeded`: a jsonb value past 256 MiB, a string past 1 GB).
fn beyond_limits(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|error| error.code())
        .is_some_and(|code| code == "54000")
}

/// What the conditions judged gave, as `conditions/settle.sql` takes it.
#[derive(Default)]
struct Settle {
    ids: Vec<Uuid>,
    outcomes: Vec<&'static str>,
    messages: Vec<Option<String>>,
    codes: Vec<Option<&'static str>>,
}

impl Settle {
    fn push(&mut self, step_id: Uuid, outcome: Result<bool, (&'static str, String)>) {
        self.ids.push(step_id);
        match outcome {
            Ok(true) => self.record("true", None, None),
            Ok(false) => self.record("false", None, None),
            Err((code, message)) => self.record("error", Some(message), Some(code)),
        }
    }

    /// A `one_failed` step none of whose parents failed: skipped.
    fn untriggered(&mut self, step_id: Uuid) {
        self.ids.push(step_id);
        self.record("untriggered", None, None);
    }

    fn record(
        &mut self,
        outcome: &'static str,
        message: Option<String>,
        code: Option<&'static str>,
    ) {
        self.outcomes.push(outcome);
        self.messages.push(message);
        self.codes.push(code);
    }
}

/// The `for_each` steps to expand, as `fan_out/expand.sql` takes them.
#[derive(Default)]
struct Expand {
    step_ids: Vec<Uuid>,
    items: Vec<Value>,
    max_parallel: Vec<Option<i32>>,
}

impl Expand {
    fn push(&mut self, step_id: Uuid, items: Vec<Value>, max_parallel: Option<i32>) {
        self.step_ids.push(step_id);
        self.items.push(Value::Array(items));
        self.max_parallel.push(max_parallel);
    }
}
