//! Judging `when` conditions: the steps a claim returned without claiming them because
//! their condition waits ([`super::claim`]).
//!
//! Each is evaluated with its task's context and description and its parents' results
//! (a skipped parent absent), in the caller's transaction: true clears the condition and
//! claims the step through the one claim (limits included); false skips it (history
//! `condition_false`) and counts it done for its children, which may be claimed or
//! judged in turn; an expression that fails, or gives no boolean, fails the step
//! permanently with the code `expression_error`.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::Dispatch;
use super::claim::{children_rows, claim_steps};
use crate::template::{evaluate_condition, task_variable};

/// A step waiting for its condition, with what the condition sees.
#[derive(sqlx::FromRow)]
struct Pending {
    step_id: Uuid,
    task_id: Uuid,
    condition: String,
    context: Value,
    namespace: String,
    name: String,
    version: String,
    priority: i16,
    tags: Value,
    parents: Value,
}

/// What judging did.
#[derive(Debug, Default)]
pub(super) struct Judged {
    /// Steps claimed: their conditions held, or a skipped step was their last parent.
    pub(super) dispatches: Vec<Dispatch>,
    /// Tasks with a step skipped or failed: they may have finished.
    pub(super) tasks: Vec<Uuid>,
}

/// Judge the conditions of the steps `to_judge`, and of the steps their skipping makes
/// ready, claiming those that run (lease of `lease_ms`).
pub(super) async fn judge(
    conn: &mut PgConnection,
    mut to_judge: Vec<Uuid>,
    lease_ms: i64,
) -> sqlx::Result<Judged> {
    let mut judged = Judged::default();
    while !to_judge.is_empty() {
        let pending: Vec<Pending> =
            sqlx::query_as(include_str!("../../../sql/conditions/pending.sql"))
                .bind(&to_judge)
                .fetch_all(&mut *conn)
                .await?;
        let (mut ids, mut outcomes, mut messages) = (Vec::new(), Vec::new(), Vec::new());
        for step in &pending {
            let task = task_variable(
                &step.namespace,
                &step.name,
                &step.version,
                step.priority,
                &step.tags,
            );
            let (outcome, message) =
                match evaluate_condition(&step.condition, &step.context, &step.parents, &task) {
                    Ok(true) => ("true", None),
                    Ok(false) => ("false", None),
                    Err(error) => ("error", Some(error)),
                };
            ids.push(step.step_id);
            outcomes.push(outcome);
            messages.push(message);
            tracing::debug!(step_id = %step.step_id, task_id = %step.task_id, outcome,
                "condition judged");
        }
        let settled: Vec<(Uuid, Uuid, String)> =
            sqlx::query_as(include_str!("../../../sql/conditions/settle.sql"))
                .bind(&ids)
                .bind(&outcomes)
                .bind(&messages)
                .fetch_all(&mut *conn)
                .await?;
        let held: Vec<Uuid> = settled
            .iter()
            .filter(|(_, _, outcome)| outcome == "true")
            .map(|(step, _, _)| *step)
            .collect();
        let skipped: Vec<Uuid> = settled
            .iter()
            .filter(|(_, _, outcome)| outcome == "false")
            .map(|(step, _, _)| *step)
            .collect();
        judged.tasks.extend(
            settled
                .iter()
                .filter(|(_, _, outcome)| outcome != "true")
                .map(|(_, task, _)| *task),
        );
        to_judge = Vec::new();
        if !held.is_empty() {
            let (dispatches, _) = claim_steps(&mut *conn, &held, lease_ms).await?;
            judged.dispatches.extend(dispatches);
        }
        if !skipped.is_empty() {
            let (dispatches, next) =
                children_rows(&mut *conn, &skipped, &[], None, lease_ms).await?;
            judged.dispatches.extend(dispatches);
            to_judge = next;
        }
    }
    judged.tasks.sort_unstable();
    judged.tasks.dedup();
    Ok(judged)
}
