//! Child tasks: `tasker.task` steps, which the coordinator runs, holding no worker slot.
//!
//! Such a step comes to [`super::conditions::judge`] like a condition. Once its condition
//! holds it starts its child in the same transaction ([`run`]): the child's context is
//! evaluated, its template looked up and the context checked against its schema, and the
//! task written with its first steps claimed, naming its parent task and step; the step
//! waits with the child as its last parent (`child_tasks/start.sql`). A step starts one
//! child, whatever its retries (`tasks.parent_step_id` is unique).
//!
//! When the child ends, the step is handed to the coordinator again
//! ([`wake_parents`], from [`super::finish_and_judge`]: where tasks finish, and through
//! [`super::children_ended`] where they are cancelled or expire) and judged by the
//! child's status:
//!
//! | child | step |
//! |---|---|
//! | complete, resolved_manually | complete, with the child's leaf results by step name (error, `results_too_large`, when they are larger together than its dependents' messages may carry) |
//! | error, attempts left (`retry_limit`, `retryable`) | the child is retried (an operator's retry of it: its failed steps run again), an attempt of the step |
//! | error, no attempt left | error, `child_task_failed`, naming the child's failed steps |
//! | cancelled | error, `child_task_cancelled` |
//! | pending, in_progress (an operator retried it) | waits again |
//!
//! A step that cannot start its child fails permanently: `expression_error` (its context),
//! `template_not_found`, `invalid_context` (the child template's schema),
//! `child_task_refused` (the child's own limit keys or conditions),
//! `child_task_too_deep` (its task is [`MAX_CHILD_DEPTH`] levels below its root already)
//! or `child_task_tree_too_large` (its tree holds [`max_task_tree`] tasks already). A
//! child that failed for either bound fails its step with the same code, without a retry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Dispatch, conditions};
use crate::states::TaskStatus;
use crate::store::tasks::{Creation, NewTask, create_children};
use crate::store::templates::{self, TemplateRecord};
use crate::template::{ChildTemplate, Problem, evaluate_map};

/// A `tasker.task` step whose condition held, with what its child needs.
pub(super) struct ChildStep {
    pub(super) step_id: Uuid,
    pub(super) task_id: Uuid,
    pub(super) step_name: String,
    pub(super) config: Value,
    /// What the child's context expression sees.
    pub(super) context: Value,
    pub(super) parents: Value,
    pub(super) task: Value,
    /// What the child inherits from its parent task.
    pub(super) priority: i16,
    pub(super) trace_parent: Option<String>,
    pub(super) deadline_at: Option<DateTime<Utc>>,
    /// How far below its root its task is: its child would be one deeper.
    pub(super) depth: i16,
    /// Its task's root task: its child would join that tree.
    pub(super) root: Uuid,
    /// Its child, once started, and the child's status.
    pub(super) child: Option<(Uuid, TaskStatus)>,
    pub(super) attempts: i32,
    pub(super) retry_limit: i32,
    pub(super) retryable: bool,
}

/// What [`run`] did.
#[derive(Debug, Default)]
pub(super) struct Ran {
    /// The new children's first steps, claimed.
    pub(super) dispatches: Vec<Dispatch>,
    /// Steps to judge in turn: those whose children ended as they were created, and
    /// those a retried child's end hands back.
    pub(super) to_judge: Vec<Uuid>,
    /// The new children's first steps the coordinator runs, to judge (or to leave ready).
    pub(super) first_steps: Vec<Uuid>,
    /// How many children were started.
    pub(super) started: usize,
    /// Steps completed with their children's results: they count for their children.
    pub(super) completed: Vec<Uuid>,
    /// Steps to fail permanently, with the code and message.
    pub(super) failed: Vec<(Uuid, &'static str, String)>,
    /// Tasks that may finish: of completed steps, and children whose every step was
    /// skipped.
    pub(super) tasks: Vec<Uuid>,
    /// Retried children's steps were left ready for the dispatcher.
    pub(super) more_ready: bool,
}

/// Start the children of `steps` that have none yet, and judge the others by their
/// child's status (module docs), in the caller's transaction; new children's first steps
/// are claimed with a lease of `lease_ms`.
pub(super) async fn run(
    conn: &mut PgConnection,
    steps: Vec<ChildStep>,
    lease_ms: i64,
) -> sqlx::Result<Ran> {
    let mut ran = Ran::default();
    let mut starts: Vec<(Uuid, Uuid, Creation)> = Vec::new();
    let mut done = Vec::new();
    let mut again: (Vec<Uuid>, Vec<bool>) = Default::default();
    let mut failed_children: Vec<(Uuid, Uuid, i32, i32, bool)> = Vec::new();
    let mut found = HashMap::new();
    let mut trees = tree_sizes(conn, &steps).await?;
    for step in steps {
        match step.child {
            None => {
                let tree = trees.entry(step.root).or_insert(1);
                if *tree >= max_task_tree() as i64 {
                    ran.failed.push((
                        step.step_id,
                        TREE_TOO_LARGE,
                        format!(
                            "the tree of child tasks of root task {} holds {} tasks already; \
                             at most {} (TASKER_MAX_TASK_TREE; a template that starts itself \
                             from several steps?)",
                            step.root,
                            *tree,
                            max_task_tree()
                        ),
                    ));
                    continue;
                }
                match creation(conn, &step, lease_ms, &mut found).await? {
                    Ok(creation) => {
                        *tree += 1;
                        starts.push((step.step_id, step.task_id, creation));
                    }
                    Err((code, message)) => ran.failed.push((step.step_id, code, message)),
                }
            }
            Some((_, TaskStatus::Complete | TaskStatus::ResolvedManually)) => {
                done.push(step.step_id);
            }
            Some((_, TaskStatus::Pending | TaskStatus::InProgress)) => {
                again.0.push(step.step_id);
                again.1.push(false);
            }
            Some((child, TaskStatus::Error)) => failed_children.push((
                step.step_id,
                child,
                step.attempts,
                step.retry_limit,
                step.retryable,
            )),
            Some((child, TaskStatus::Cancelled)) => ran.failed.push((
                step.step_id,
                "child_task_cancelled",
                format!("child task {child} was cancelled"),
            )),
        }
    }
    if !failed_children.is_empty() {
        let children: Vec<Uuid> = failed_children
            .iter()
            .map(|(_, child, ..)| *child)
            .collect();
        let failures: HashMap<Uuid, (String, Option<String>)> =
            sqlx::query_as(include_str!("../../../sql/child_tasks/failure.sql"))
                .bind(&children)
                .bind(UNMENDABLE)
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .map(|(task, failure, unmendable)| (task, (failure, unmendable)))
                .collect();
        for (step, child, attempts, retry_limit, retryable) in failed_children {
            let (failure, unmendable) = failures
                .get(&child)
                .map_or(("", None), |(failure, unmendable)| {
                    (failure.as_str(), unmendable.as_deref())
                });
            if let Some(code) = unmendable {
                // Past a bound of child tasks below: every retry would fail the same way,
                // at every level up.
                let code = UNMENDABLE
                    .into_iter()
                    .find(|known| *known == code)
                    .unwrap_or(TREE_TOO_LARGE);
                ran.failed
                    .push((step, code, format!("child task {child} failed: {failure}")));
            } else if retryable && attempts < retry_limit {
                again.0.push(step);
                again.1.push(true);
            } else {
                ran.failed.push((
                    step,
                    "child_task_failed",
                    format!(
                        "child task {child} failed (attempt {attempts} of {retry_limit}): {failure}"
                    ),
                ));
            }
        }
    }
    if !done.is_empty() {
        let conditions::Completed {
            completed,
            too_large,
        } = conditions::complete_within_limits(
            &mut *conn,
            include_str!("../../../sql/child_tasks/done.sql"),
            &done,
        )
        .await?;
        for (step, task) in completed {
            ran.completed.push(step);
            ran.tasks.push(task);
        }
        for (step, size) in too_large {
            ran.failed.push((
                step,
                conditions::RESULTS_TOO_LARGE,
                conditions::results_too_large("its child task's results (of its last steps)", size),
            ));
        }
    }
    if !again.0.is_empty() {
        let waiting: Vec<(Uuid, Uuid, bool)> =
            sqlx::query_as(include_str!("../../../sql/child_tasks/rewait.sql"))
                .bind(&again.0)
                .bind(&again.1)
                .fetch_all(&mut *conn)
                .await?;
        let mut changed = Vec::new();
        for (step, child, retried) in waiting {
            if !retried {
                continue;
            }
            let reason = format!("retried by its parent step {step}");
            match super::operator::retry_task(&mut *conn, child, Some(&reason)).await {
                Ok(_) => ran.more_ready = true,
                Err(super::OperatorError::Database(error)) => return Err(error),
                // No longer in error: an operator resolved or retried it meanwhile.
                Err(_) => changed.push(child),
            }
        }
        // Their steps are judged again at once, by what the children are now.
        ran.to_judge.extend(wake_parents(conn, &changed).await?);
    }
    if !starts.is_empty() {
        start(conn, starts, &mut ran).await?;
    }
    Ok(ran)
}

/// Start the children `starts` (step, its task, the child's creation): the steps first,
/// so that a step another transaction started is left alone, then the children of those
/// started.
async fn start(
    conn: &mut PgConnection,
    starts: Vec<(Uuid, Uuid, Creation)>,
    ran: &mut Ran,
) -> sqlx::Result<()> {
    let steps: Vec<Uuid> = starts.iter().map(|(step, ..)| *step).collect();
    let children: Vec<Uuid> = starts.iter().map(|(.., c)| c.task_id()).collect();
    let started: Vec<Uuid> = sqlx::query_scalar(include_str!("../../../sql/child_tasks/start.sql"))
        .bind(&steps)
        .bind(&children)
        .fetch_all(&mut *conn)
        .await?;
    let (mut creations, mut parents) = (Vec::new(), (Vec::new(), Vec::new()));
    for (step, task, creation) in starts {
        if started.contains(&step) {
            parents.0.push(task);
            parents.1.push(step);
            creations.push(creation);
        }
    }
    if creations.is_empty() {
        return Ok(());
    }
    let created = create_children(&mut *conn, &creations).await?;
    let children: Vec<Uuid> = created.iter().map(|child| child.task_id).collect();
    let linked: Vec<(Uuid, bool)> =
        sqlx::query_as(include_str!("../../../sql/child_tasks/link.sql"))
            .bind(&children)
            .bind(&parents.0)
            .bind(&parents.1)
            .fetch_all(&mut *conn)
            .await?;
    tracing::debug!(children = children.len(), "child tasks started");
    ran.started += created.len();
    for child in created {
        ran.dispatches.extend(child.dispatches);
        ran.first_steps.extend(child.to_judge);
        if child.all_skipped {
            ran.tasks.push(child.task_id);
        }
    }
    // A child its template's concurrency cancelled at once: its step is judged now.
    let ended: Vec<Uuid> = linked
        .into_iter()
        .filter(|(_, ended)| *ended)
        .map(|(task, _)| task)
        .collect();
    ran.to_judge.extend(wake_parents(conn, &ended).await?);
    Ok(())
}

/// A statement of `shared/sql/child_tasks/` with its conditions in place (as
/// `shared/tests/sql.rs` does when it checks them): the steps waiting for a child that
/// ended without handing them back, and the children of a task a claim cancelled. The
/// sweeper's probe and its work read the same conditions.
fn with_conditions(statement: &str) -> String {
    statement
        .replace(
            "{WAITING_FOR_ENDED_CHILD}",
            include_str!("../../../sql/child_tasks/waiting_for_ended_child.sql"),
        )
        .replace(
            "{ORPHAN_OF_A_CLAIM}",
            include_str!("../../../sql/child_tasks/orphan_of_a_claim.sql"),
        )
}

/// Whether a claim left work for [`UNHEARD`] or [`ORPHANS`].
pub(super) static LEFT_BY_CLAIMS: LazyLock<String> =
    LazyLock::new(|| with_conditions(include_str!("../../../sql/child_tasks/left_by_claims.sql")));
/// Children that ended while their step still waits for them.
pub(super) static UNHEARD: LazyLock<String> =
    LazyLock::new(|| with_conditions(include_str!("../../../sql/child_tasks/unheard.sql")));
/// Running children of a task a claim cancelled.
pub(super) static ORPHANS: LazyLock<String> =
    LazyLock::new(|| with_conditions(include_str!("../../../sql/child_tasks/orphans.sql")));

/// How far below its root task a child task may be.
const MAX_CHILD_DEPTH: i16 = 32;

/// The codes of a step that cannot start its child for the bounds of child tasks; a
/// child that failed so fails the step above it with the same code, without a retry.
const TOO_DEEP: &str = "child_task_too_deep";
const TREE_TOO_LARGE: &str = "child_task_tree_too_large";
const UNMENDABLE: [&str; 2] = [TOO_DEEP, TREE_TOO_LARGE];

/// Most tasks a tree of child tasks may hold, its root included (the coordinator's
/// `TASKER_MAX_TASK_TREE`).
static MAX_TASK_TREE: AtomicUsize = AtomicUsize::new(10_000);

/// Most tasks a tree of child tasks may hold, its root included: a `tasker.task` step
/// whose tree holds as many fails instead of starting its child
/// (`child_task_tree_too_large`). Coordinators count the tree before they start children,
/// each for its own transaction, so trees growing in several at once may pass it by
/// what those start together (at most 256 children each).
pub fn max_task_tree() -> usize {
    MAX_TASK_TREE.load(Ordering::Relaxed)
}

/// Set [`max_task_tree`] for this process (the coordinator's `TASKER_MAX_TASK_TREE`).
pub fn set_max_task_tree(max: usize) {
    MAX_TASK_TREE.store(max, Ordering::Relaxed);
}

/// How many tasks the trees of the `steps` that start a child hold, by root task.
async fn tree_sizes(
    conn: &mut PgConnection,
    steps: &[ChildStep],
) -> sqlx::Result<HashMap<Uuid, i64>> {
    let mut roots: Vec<Uuid> = steps
        .iter()
        .filter(|step| step.child.is_none())
        .map(|step| step.root)
        .collect();
    roots.sort_unstable();
    roots.dedup();
    if roots.is_empty() {
        return Ok(HashMap::new());
    }
    let sizes: Vec<(Uuid, i64)> =
        sqlx::query_as(include_str!("../../../sql/child_tasks/tree_sizes.sql"))
            .bind(&roots)
            .bind(max_task_tree() as i64)
            .fetch_all(conn)
            .await?;
    Ok(sizes.into_iter().collect())
}

/// The templates a batch looked up, by namespace, name and version asked for.
type Found = HashMap<(String, String, Option<String>), Option<Arc<TemplateRecord>>>;

/// The child task of `step`, ready to write; or why it cannot start (a code and a
/// message). `found` keeps the templates looked up in this batch.
async fn creation(
    conn: &mut PgConnection,
    step: &ChildStep,
    lease_ms: i64,
    found: &mut Found,
) -> sqlx::Result<Result<Creation, (&'static str, String)>> {
    if step.depth >= MAX_CHILD_DEPTH {
        return Ok(Err((
            TOO_DEEP,
            format!(
                "task {} is {} levels below its root task; a child task may be at most \
                 {MAX_CHILD_DEPTH} (a template that starts itself without end?)",
                step.task_id, step.depth
            ),
        )));
    }
    let Some(child) = ChildTemplate::of(&step.config) else {
        return Ok(Err((
            "invalid_config",
            "`tasker.task` needs `config: {namespace, name, version?, context?}`".to_owned(),
        )));
    };
    let context = match child.context {
        None => json!({}),
        Some(source) => match evaluate_map(source, &step.context, &step.parents, &step.task) {
            Ok(context) => context,
            Err(error) => {
                return Ok(Err((
                    "expression_error",
                    format!("the child's context {error}"),
                )));
            }
        },
    };
    let key = (
        child.namespace.to_owned(),
        child.name.to_owned(),
        child.version.map(str::to_owned),
    );
    let template = match found.get(&key) {
        Some(template) => template.clone(),
        None => {
            let template = templates::find(&mut *conn, child.namespace, child.name, child.version)
                .await?
                .map(Arc::new);
            found.insert(key, template.clone());
            template
        }
    };
    let Some(template) = template else {
        return Ok(Err((
            "template_not_found",
            format!(
                "no template {}/{}{} to start as a child task",
                child.namespace,
                child.name,
                child.version.map(|v| format!(" {v}")).unwrap_or_default()
            ),
        )));
    };
    let definition = &template.definition;
    let about = format!(
        "{}/{} {}",
        definition.namespace, definition.name, definition.version
    );
    if let Err(problems) = definition.validate_context(&context) {
        return Ok(Err((
            "invalid_context",
            format!(
                "the child's context does not match the schema of {about}: {}",
                Problem::listed(&problems)
            ),
        )));
    }
    let new = NewTask {
        context,
        initiator: Some("tasker.task".to_owned()),
        reason: Some(format!(
            "step `{}` of task {}",
            step.step_name, step.task_id
        )),
        tags: json!([]),
        trace_parent: step.trace_parent.clone(),
        priority: Some(step.priority),
        deadline: step.deadline_at,
        ..NewTask::default()
    };
    Ok(
        Creation::new(template, Arc::new(new), Some(lease_ms), None).map_err(|problems| {
            (
                "child_task_refused",
                format!(
                    "{about} refused the child task: {}",
                    Problem::listed(&problems)
                ),
            )
        }),
    )
}

/// Hand the `tasker.task` steps whose children are among the ended `tasks` back to the
/// coordinator: each becomes ready to judge. Returns those steps.
pub(super) async fn wake_parents(
    conn: &mut PgConnection,
    tasks: &[Uuid],
) -> sqlx::Result<Vec<Uuid>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(include_str!("../../../sql/child_tasks/wake.sql"))
        .bind(tasks)
        .fetch_all(conn)
        .await
}
