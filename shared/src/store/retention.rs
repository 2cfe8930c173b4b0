//! Retention: removing finished tasks with everything that belongs to them.
//!
//! The task graph has no foreign keys (migrations 0005 and 0007), so nothing cascades: a
//! batch deletes, in one statement, the tasks, their steps, their edges and both
//! histories. The history is also the events outbox, so a task is removed only once the
//! events relay has passed every transition it has.
//!
//! The cost of a batch does not grow with the tables: candidates are found on
//! `tasks_by_status` (status, task_id), bounded by the UUIDv7 task ids of the cutoff, and
//! each task's rows are reached through indexes that lead with its id. Besides the
//! candidates, a batch reads the finished tasks created in the [`CLOCK_SKEW`] after the
//! cutoff (their ids are below the bound, their completion is not): ten minutes of
//! finished work, however large the tables.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::states::TaskStatus;

/// The advisory lock one pruning batch holds, so coordinators prune one at a time.
const PRUNE_LOCK: i64 = 0x7461_736b_7072_756e; // "taskprun"

/// Task statuses that are final and may be pruned.
const FINISHED: [TaskStatus; 4] = [
    TaskStatus::Complete,
    TaskStatus::Error,
    TaskStatus::Cancelled,
    TaskStatus::ResolvedManually,
];

/// How far ahead of the cutoff the task id bound lies: a task id carries its creating
/// coordinator's clock, which may run ahead of the database's (as the task list's time
/// window allows for).
const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// What one batch removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Tasks.
    pub tasks: u64,
    /// Their steps.
    pub steps: u64,
    /// Their edges.
    pub edges: u64,
    /// Their task and step transitions.
    pub transitions: u64,
}

/// Which finished tasks may go.
#[derive(Debug, Clone, Copy)]
pub struct PruneScope {
    /// Tasks that finished before this.
    pub finished_before: DateTime<Utc>,
    /// Keep tasks with transitions the events relay has not published yet (events on).
    pub keep_unrelayed: bool,
}

impl PruneScope {
    /// The smallest UUIDv7 of the millisecond `at` (plus the clock skew): every task
    /// created before the cutoff has a smaller id.
    fn id_bound(&self) -> Uuid {
        let ms = (self.finished_before + CLOCK_SKEW)
            .timestamp_millis()
            .max(0)
            .unsigned_abs();
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        bytes[6] = 0x70;
        bytes[8] = 0x80;
        Uuid::from_bytes(bytes)
    }
}

fn finished() -> Vec<String> {
    FINISHED.iter().map(|s| s.as_str().to_owned()).collect()
}

/// The candidates' condition, shared by [`prune_batch`] and [`count_prunable`]: `$1`
/// finished statuses, `$2` the task id bound, `$3` the cutoff, `$4` whether to keep
/// unrelayed history.
const CANDIDATES: &str = include_str!("../../sql/retention/candidates.sql");

/// A statement of `shared/sql/retention/` that takes [`CANDIDATES`] in place of its
/// `{CANDIDATES}` (as `shared/tests/sql.rs` does when it checks them).
fn with_candidates(statement: &str) -> String {
    statement.replace("{CANDIDATES}", CANDIDATES)
}

/// Remove up to `limit` finished tasks of `scope` with their steps, edges and history,
/// in one transaction. `None` when another coordinator is pruning right now.
pub async fn prune_batch<'c>(
    db: impl sqlx::Acquire<'c, Database = Postgres>,
    scope: PruneScope,
    limit: i64,
) -> sqlx::Result<Option<Pruned>> {
    let mut tx = db.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(PRUNE_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(None);
    }
    let pruned = delete_batch(&mut tx, scope, limit).await?;
    tx.commit().await?;
    Ok(Some(pruned))
}

async fn delete_batch(
    tx: &mut Transaction<'_, Postgres>,
    scope: PruneScope,
    limit: i64,
) -> sqlx::Result<Pruned> {
    let sql = with_candidates(include_str!("../../sql/retention/lock_batch.sql"));
    let tasks: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(finished())
        .bind(scope.id_bound())
        .bind(scope.finished_before)
        .bind(scope.keep_unrelayed)
        .bind(limit)
        .fetch_all(&mut **tx)
        .await?;
    if tasks.is_empty() {
        return Ok(Pruned::default());
    }
    let (steps, edges, transitions, removed): (i64, i64, i64, i64) =
        sqlx::query_as(include_str!("../../sql/retention/delete_batch.sql"))
            .bind(&tasks)
            .fetch_one(&mut **tx)
            .await?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(Pruned {
        tasks: count(removed),
        steps: count(steps),
        edges: count(edges),
        transitions: count(transitions),
    })
}

/// How many tasks [`prune_batch`] would remove in all (a dry run). Reads every candidate:
/// for an operator's one-off question, not for a loop.
pub async fn count_prunable(pool: &PgPool, scope: PruneScope) -> sqlx::Result<i64> {
    let sql = with_candidates(include_str!("../../sql/retention/count_prunable.sql"));
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(finished())
        .bind(scope.id_bound())
        .bind(scope.finished_before)
        .bind(scope.keep_unrelayed)
        .fetch_one(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_bound_is_above_every_id_made_before_the_cutoff_and_below_later_ones() {
        let cutoff = Utc::now() - chrono::TimeDelta::days(30);
        let scope = PruneScope {
            finished_before: cutoff,
            keep_unrelayed: true,
        };
        let at = |when: DateTime<Utc>| {
            let ms = when.timestamp_millis().unsigned_abs();
            Uuid::new_v7(uuid::Timestamp::from_unix(
                uuid::NoContext,
                ms / 1000,
                u32::try_from(ms % 1000).unwrap() * 1_000_000,
            ))
        };
        assert!(at(cutoff) < scope.id_bound());
        assert!(at(cutoff + CLOCK_SKEW - chrono::TimeDelta::milliseconds(1)) < scope.id_bound());
        assert!(at(cutoff + CLOCK_SKEW + chrono::TimeDelta::milliseconds(1)) > scope.id_bound());
        assert_eq!(scope.id_bound().get_version_num(), 7);
    }
}
