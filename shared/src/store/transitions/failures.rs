//! What a step's failure for good does beyond the step: an instance of a `for_each` step
//! fails that step (`fan_out/instance_failed.sql`), and the children that run whatever
//! their parents' outcome (`trigger: all_done`) or only after a failure (`one_failed`)
//! count the failed steps as finished (`triggers/count_failed.sql`). Every path that
//! fails a step calls [`failed`]: results, conditions and lists that cannot be
//! evaluated, expired leases, waits past their timeout.

use sqlx::PgConnection;
use uuid::Uuid;

use super::claim::{claim_steps, judge_after};
use super::conditions::Judged;

/// Count the steps `failed` (just failed for good) for their `for_each` steps and their
/// children; returns the children this made ready, for the caller to claim (or to leave
/// to the dispatcher).
pub(super) async fn failed(conn: &mut PgConnection, failed: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    if failed.is_empty() {
        return Ok(Vec::new());
    }
    let mut all: Vec<Uuid> =
        sqlx::query_scalar(include_str!("../../../sql/fan_out/instance_failed.sql"))
            .bind(failed)
            .fetch_all(&mut *conn)
            .await?;
    all.extend_from_slice(failed);
    let counted: Vec<(Uuid, bool)> =
        sqlx::query_as(include_str!("../../../sql/triggers/count_failed.sql"))
            .bind(&all)
            .fetch_all(&mut *conn)
            .await?;
    Ok(counted
        .into_iter()
        .filter(|(_, ready)| *ready)
        .map(|(step, _)| step)
        .collect())
}

/// [`failed`], then claim (or judge) the children it made ready, with a lease of
/// `lease_ms`. Answers what judging did, the claimed steps among it (see
/// [`super::claim_children`]).
pub(super) async fn failed_and_claimed(
    conn: &mut PgConnection,
    steps: &[Uuid],
    lease_ms: i64,
) -> sqlx::Result<Judged> {
    let ready = failed(conn, steps).await?;
    if ready.is_empty() {
        return Ok(Judged::default());
    }
    let (dispatches, to_judge) = claim_steps(conn, &ready, lease_ms).await?;
    judge_after(conn, dispatches, to_judge, lease_ms).await
}
