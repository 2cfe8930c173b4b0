//! What workers report: started notices, heartbeats and results.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Dispatch, claim_children};
use crate::decision::{Backoff, Change, Decision, StepState, decide};
use crate::messages::{Outcome, RunningStep, StepResult, StepStarted};
use crate::states::{StepStatus, TransitionReason};

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

/// How long a step that started waited for a worker.
#[derive(Debug, Clone)]
pub struct QueueLatency {
    /// From becoming ready to starting, in seconds.
    pub latency: f64,
    /// The task's namespace.
    pub namespace: String,
}

/// What [`mark_started`] did.
#[derive(Debug, Default)]
pub struct StartedSteps {
    /// Per step that changed, its queue latency.
    pub latencies: Vec<QueueLatency>,
    /// The runs withdrawn from their workers (see [`Heartbeats::withdrawn`]), and the
    /// redelivered copies of steps that ended under the same dispatch.
    pub withdrawn: Vec<RunningStep>,
    /// Runs lost to a crash loop, not started: the caller fails their steps (see
    /// [`RESTARTS_PAST_RETRY_LIMIT`]).
    pub lost: Vec<LostRun>,
}

/// How many runs past its `retry_limit` a step restarted after a redelivery may count.
/// The worker that ran it before may only have lost its broker connection and still be
/// running, so a restart cannot fail the step at its limit; but a message whose handler
/// kills every worker that starts it is redelivered for ever on a classic queue, so past
/// this the coordinator fails it (`worker_lost`).
pub const RESTARTS_PAST_RETRY_LIMIT: i32 = 3;

/// A redelivered new run of a step whose attempts reached `retry_limit` +
/// [`RESTARTS_PAST_RETRY_LIMIT`]: not started.
#[derive(Debug, Clone, PartialEq)]
pub struct LostRun {
    /// The step's task.
    pub task_id: Uuid,
    /// The step.
    pub step_id: Uuid,
    /// The dispatch it ran under.
    pub dispatch_token: Uuid,
    /// The step's attempts, every one of them started.
    pub attempts: i32,
}

/// What [`heartbeat`] did.
#[derive(Debug, Default)]
pub struct Heartbeats {
    /// Leases extended.
    pub extended: u64,
    /// Runs a worker reported that are no longer wanted: their step was cancelled (a
    /// claim cancelled its task as the oldest of its template's concurrency key, or a
    /// cancel's broadcast did not reach the worker), or is no longer under that dispatch
    /// (handed back and dispatched again, or removed). The caller tells workers to
    /// abort them: a run nobody announced as withdrawn would otherwise go on until it
    /// ends, its result dropped by the fence.
    pub withdrawn: Vec<RunningStep>,
}

/// A row of `mark_started.sql`: a changed step's latency, a withdrawn run, or a lost one
/// (with its task and attempts).
#[derive(sqlx::FromRow)]
struct StartedRow {
    latency: Option<f64>,
    namespace: Option<String>,
    step_id: Option<Uuid>,
    token: Option<Uuid>,
    task_id: Option<Uuid>,
    attempts: Option<i32>,
}

/// Mark steps `in_progress` from workers' started notices (all workers of a batch in one
/// statement), with a lease of `min(timeout + grace, heartbeat lease)`.
///
/// A notice for a step that is already running under the same dispatch token, on a
/// redelivered message and with another start time, means a second run: its first
/// worker died mid-step, or lost its broker connection and may still be running it. The
/// new run counts as a new attempt, even past the retry limit, since the first run may
/// yet answer; the dispatch token lets only one result through. Past the limit by
/// [`RESTARTS_PAST_RETRY_LIMIT`], the run is not started but returned as lost: every
/// worker that started the message stopped before answering, as one whose handler
/// kills its worker does. A notice applied again (a redelivered batch of notices)
/// carries the start time already stored and changes nothing. Notices for steps that
/// moved on are ignored; those of runs withdrawn from their worker, and redelivered
/// copies of steps that ended under the same dispatch, are answered. Returns, per step
/// that changed, its queue latency.
pub async fn mark_started(
    conn: &mut PgConnection,
    started: &[Started],
    lease: LeasePolicy,
) -> sqlx::Result<StartedSteps> {
    if started.is_empty() {
        return Ok(StartedSteps::default());
    }
    let rows: Vec<StartedRow> =
        sqlx::query_as(include_str!("../../../sql/worker/mark_started.sql"))
            .bind(started.iter().map(|s| s.step.step_id).collect::<Vec<_>>())
            .bind(
                started
                    .iter()
                    .map(|s| s.step.dispatch_token)
                    .collect::<Vec<_>>(),
            )
            .bind(
                started
                    .iter()
                    .map(|s| s.step.started_at)
                    .collect::<Vec<_>>(),
            )
            .bind(
                started
                    .iter()
                    .map(|s| s.step.redelivered)
                    .collect::<Vec<_>>(),
            )
            .bind(lease.grace_ms)
            .bind(lease.heartbeat_lease_ms)
            .bind(
                started
                    .iter()
                    .map(|s| s.worker_id.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(RESTARTS_PAST_RETRY_LIMIT)
            .fetch_all(conn)
            .await?;
    let mut answer = StartedSteps::default();
    for row in rows {
        match (row.latency, row.namespace, row.step_id, row.token) {
            (Some(latency), Some(namespace), ..) => {
                answer.latencies.push(QueueLatency { latency, namespace })
            }
            (_, _, Some(step_id), Some(dispatch_token)) => match row.task_id.zip(row.attempts) {
                Some((task_id, attempts)) => answer.lost.push(LostRun {
                    task_id,
                    step_id,
                    dispatch_token,
                    attempts,
                }),
                None => answer.withdrawn.push(RunningStep {
                    step_id,
                    dispatch_token,
                }),
            },
            _ => {}
        }
    }
    Ok(answer)
}

/// A step [`lock_batch`] could not lock: another transaction holds its row, or for a
/// result the row of one of its children.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HeldStep {
    /// The step.
    pub step_id: Uuid,
    /// Its status as last committed. The holder may be changing it.
    pub status: StepStatus,
}

impl HeldStep {
    /// Whether a started notice or heartbeat for the step may still matter once the
    /// holder commits: the step was still queued or running, and the holder may leave it
    /// so (a heartbeat, a duplicate notice). Otherwise the step has moved on and the
    /// notice is moot.
    pub fn may_still_run(&self) -> bool {
        matches!(self.status, StepStatus::Enqueued | StepStatus::InProgress)
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
/// (BENCHMARKS.md). Skipping what is held never waits. The statements that follow touch
/// the rows locked here, and the children of steps the coordinator judges done in the
/// batch ([`super::claim::lock_children`]), which they wait for: two batches that each
/// judge a step whose child the other holds deadlock, PostgreSQL fails one of them, and
/// its messages are applied again in a later batch. A step whose row does not exist is
/// not held; applying its message counts it as stale.
pub async fn lock_batch(
    conn: &mut PgConnection,
    steps: &[Uuid],
    results: &[Uuid],
) -> sqlx::Result<Vec<HeldStep>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(LOCK_BATCH.as_str())
        .bind(steps)
        .bind(results)
        .fetch_all(conn)
        .await
}

/// The rows a batch of worker messages changes, as two CTEs for [`lock_batch`] and
/// [`wait_for_steps`], which must agree on them: `children` (each result in `$2` with
/// a child, one index probe per result: the module's "Plans") and `wanted` (the steps
/// in `$1` and those children).
const BATCH_ROWS: &str = include_str!("../../../sql/worker/batch_rows.sql");

/// A statement of `shared/sql/worker/` with [`BATCH_ROWS`] in place of its
/// `{BATCH_ROWS}` (as `shared/tests/sql.rs` does when it checks them).
fn with_batch_rows(statement: &str) -> String {
    statement.replace("{BATCH_ROWS}", BATCH_ROWS)
}

static LOCK_BATCH: LazyLock<String> =
    LazyLock::new(|| with_batch_rows(include_str!("../../../sql/worker/lock_batch.sql")));
static WAIT_FOR_STEPS: LazyLock<String> =
    LazyLock::new(|| with_batch_rows(include_str!("../../../sql/worker/wait_for_steps.sql")));

/// Wait, up to `timeout`, until no other transaction holds the rows [`lock_batch`]
/// would lock for these steps and results; returns whether they came free. The rows
/// are locked in id order and stay locked until the caller's transaction ends: call it
/// in a transaction of its own, before anything else, and end that transaction at once.
/// It cannot deadlock: it holds nothing else and takes its rows in order (a batch it
/// waits for that waits in turn, for the children of a step it judged, ends, committed
/// or failed by PostgreSQL's deadlock check). While it waits, the rows it already has are
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
    let waited = sqlx::query(WAIT_FOR_STEPS.as_str())
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
/// Returns how many leases were extended, and the runs withdrawn from their worker.
pub async fn heartbeat(
    conn: &mut PgConnection,
    running: &[RunningStep],
    lease: LeasePolicy,
) -> sqlx::Result<Heartbeats> {
    if running.is_empty() {
        return Ok(Heartbeats::default());
    }
    let (extended, steps, tokens): (i64, Vec<Uuid>, Vec<Uuid>) =
        sqlx::query_as(include_str!("../../../sql/worker/heartbeat.sql"))
            .bind(running.iter().map(|s| s.step_id).collect::<Vec<_>>())
            .bind(running.iter().map(|s| s.dispatch_token).collect::<Vec<_>>())
            .bind(lease.grace_ms)
            .bind(lease.heartbeat_lease_ms)
            .fetch_one(conn)
            .await?;
    Ok(Heartbeats {
        extended: extended as u64,
        withdrawn: steps
            .into_iter()
            .zip(tokens)
            .map(|(step_id, dispatch_token)| RunningStep {
                step_id,
                dispatch_token,
            })
            .collect(),
    })
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
    /// Children the results made ready, claimed in the same transaction: the caller
    /// publishes them after the commit.
    pub claimed: Vec<Dispatch>,
    /// Tasks with a `for_each` step still waiting for instances these results did not
    /// finish: they have work left, whatever else happened.
    pub fanning_out: Vec<Uuid>,
    /// Tasks that judging the children changed (a step skipped, a child task started
    /// with every step skipped): they may have finished.
    pub judged_tasks: Vec<Uuid>,
    /// Steps were made ready and left to the dispatcher (a fan-out's instances past the
    /// first batch): the caller wakes it.
    pub more_ready: bool,
}

impl AppliedResults {
    /// The changed tasks that may have finished. A task with a step just claimed, or
    /// just sent to wait for a retry, still has work, so only the others are worth
    /// locking and counting. Over diamonds that is half of them: the first step's and
    /// the last parent's results each claim the next steps.
    pub fn may_finish(&self) -> Vec<Uuid> {
        let busy: std::collections::HashSet<Uuid> = self
            .claimed
            .iter()
            .map(|d| d.message.task_id)
            .chain(
                self.changes
                    .iter()
                    .filter(|c| c.waits_for_retry())
                    .map(|c| c.task_id),
            )
            .chain(self.fanning_out.iter().copied())
            .collect();
        let mut tasks: Vec<Uuid> = self
            .tasks
            .iter()
            .chain(&self.judged_tasks)
            .filter(|task| !busy.contains(task))
            .copied()
            .collect();
        tasks.sort_unstable();
        tasks.dedup();
        tasks
    }
}

/// One applied result.
#[derive(Debug, Clone)]
pub struct StepChange {
    /// The step's task.
    pub task_id: Uuid,
    /// The task's namespace.
    pub namespace: String,
    /// `complete`, `waiting_for_retry` or `error`.
    pub to_status: StepStatus,
    /// Whether the result was a deferral.
    pub deferred: bool,
    /// From ready to started, when this result overtook its started notice (otherwise
    /// [`mark_started`] reported it).
    pub queue_latency: Option<f64>,
}

impl StepChange {
    /// The result sent the step to wait for another attempt (a retry or a deferral).
    pub fn waits_for_retry(&self) -> bool {
        self.to_status == StepStatus::WaitingForRetry
    }
}

/// A step as a batch of results finds it.
#[derive(sqlx::FromRow)]
struct CurrentRow {
    step_id: Uuid,
    task_id: Uuid,
    namespace: String,
    /// Whether its task's template has limits.
    keyed: bool,
    status: StepStatus,
    dispatch_token: Option<Uuid>,
    attempts: i32,
    retry_limit: i32,
    retryable: bool,
    deferrals: i32,
    max_deferrals: i32,
    backoff_base_ms: i64,
    backoff_max_ms: i64,
    backoff_jitter: bool,
    backoff_schedule_ms: Option<Vec<i64>>,
    ready_at: Option<DateTime<Utc>>,
    /// An instance's `for_each` step.
    fan_out_of: Option<Uuid>,
}

impl CurrentRow {
    fn state(&self) -> StepState {
        StepState {
            status: self.status,
            dispatch_token: self.dispatch_token,
            attempts: self.attempts,
            retry_limit: self.retry_limit,
            retryable: self.retryable,
            deferrals: self.deferrals,
            max_deferrals: self.max_deferrals,
            backoff: Backoff {
                base_ms: self.backoff_base_ms,
                max_ms: self.backoff_max_ms,
                jitter: self.backoff_jitter,
                schedule_ms: self.backoff_schedule_ms.clone(),
            },
        }
    }
}

/// Apply a batch of results: read their steps, let [`decide`] say what each result does
/// (complete, retry after a backoff, defer, fail, or drop as stale), write that with its
/// history rows, and claim the children whose last parent completed
/// ([`claim_children`]: the one claim path, with a lease of `lease_ms`).
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
    let ids: Vec<Uuid> = unique.iter().map(|r| r.step_id).collect();
    let current: HashMap<Uuid, CurrentRow> =
        sqlx::query_as::<_, CurrentRow>(include_str!("../../../sql/results/current.sql"))
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|row| (row.step_id, row))
            .collect();

    let mut write = ResultWrites::default();
    let mut changes = Vec::new();
    for result in unique {
        let Some(row) = current.get(&result.step_id) else {
            continue;
        };
        let Decision::Apply(change) = decide(&row.state(), result, rand::random()) else {
            continue;
        };
        // The started notice has not been applied (the result overtook it): this result
        // carries the queue latency.
        let queue_latency = row
            .ready_at
            .filter(|_| row.status == StepStatus::Enqueued)
            .map(|ready| (result.started_at - ready).as_seconds_f64().max(0.0));
        changes.push(StepChange {
            task_id: row.task_id,
            namespace: row.namespace.clone(),
            to_status: change.to,
            deferred: result.outcome == Outcome::Deferred,
            queue_latency,
        });
        write.push(row, result, change);
    }
    let completed = write.completed();
    let failed = write.failed();
    // Whether the claim of their children must look for keys.
    let keyed = completed
        .iter()
        .any(|step| current.get(step).is_some_and(|row| row.keyed));
    let freed = write.execute(&mut *conn).await?;
    let children = claim_children(&mut *conn, &completed, &freed, Some(keyed), lease_ms).await?;
    // Steps failed for good: their `for_each` steps fail, their clean-up and compensation
    // children may run.
    let after_failures = super::failures::failed_and_claimed(&mut *conn, &failed, lease_ms).await?;
    let mut claimed = children.dispatches;
    claimed.extend(after_failures.dispatches);
    let more_ready = children.more_ready || after_failures.more_ready;
    let mut judged_tasks = children.tasks;
    judged_tasks.extend(after_failures.tasks);
    // A task whose instances complete is not finished while their step waits for more:
    // asked here by primary key, it spares counting all its steps (thousands) per batch.
    let mut fan_outs: Vec<Uuid> = completed
        .iter()
        .filter_map(|step| current.get(step).and_then(|row| row.fan_out_of))
        .collect();
    fan_outs.sort_unstable();
    fan_outs.dedup();
    let fanning_out = if fan_outs.is_empty() {
        Vec::new()
    } else {
        sqlx::query_scalar(
            "SELECT task_id FROM steps \
             WHERE step_id = ANY($1) AND status = 'pending' AND remaining_parents > 0",
        )
        .bind(&fan_outs)
        .fetch_all(&mut *conn)
        .await?
    };

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
        fanning_out,
        judged_tasks,
        more_ready,
    })
}

/// The decided changes of a batch of results, as the columns of one statement.
#[derive(Default)]
struct ResultWrites {
    step_ids: Vec<Uuid>,
    from_status: Vec<StepStatus>,
    to_status: Vec<StepStatus>,
    reasons: Vec<TransitionReason>,
    results: Vec<Option<Value>>,
    last_errors: Vec<Option<Value>>,
    run_attempts: Vec<i32>,
    attempts: Vec<i32>,
    deferrals: Vec<i32>,
    delays_ms: Vec<Option<f64>>,
    started_at: Vec<DateTime<Utc>>,
    finished_at: Vec<DateTime<Utc>>,
    worker_ids: Vec<String>,
    error_codes: Vec<Option<String>>,
}

impl ResultWrites {
    fn push(&mut self, row: &CurrentRow, result: &StepResult, change: Change) {
        self.step_ids.push(row.step_id);
        self.from_status.push(row.status);
        self.to_status.push(change.to);
        self.reasons.push(change.reason);
        self.results.push(
            (change.to == StepStatus::Complete)
                .then(|| result.results.clone().unwrap_or_else(|| json!({}))),
        );
        self.last_errors.push(change.last_error);
        self.run_attempts.push(row.attempts);
        self.attempts.push(change.attempts);
        self.deferrals.push(change.deferrals);
        self.delays_ms.push(change.delay_ms);
        self.started_at.push(result.started_at);
        self.finished_at.push(result.finished_at);
        self.worker_ids.push(result.worker_id.clone());
        self.error_codes
            .push(result.error.as_ref().and_then(|e| e.code.clone()));
    }

    /// The steps these results complete.
    fn completed(&self) -> Vec<Uuid> {
        self.step_ids
            .iter()
            .zip(&self.to_status)
            .filter(|(_, to)| **to == StepStatus::Complete)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The steps these results fail for good.
    fn failed(&self) -> Vec<Uuid> {
        self.step_ids
            .iter()
            .zip(&self.to_status)
            .filter(|(_, to)| **to == StepStatus::Error)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Write the changes; returns the concurrency keys of the changed steps, each of
    /// which freed a slot.
    async fn execute(self, conn: &mut PgConnection) -> sqlx::Result<Vec<String>> {
        if self.step_ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(include_str!("../../../sql/results/apply.sql"))
            .bind(self.step_ids)
            .bind(self.from_status)
            .bind(self.to_status)
            .bind(self.reasons)
            .bind(self.results)
            .bind(self.last_errors)
            .bind(self.run_attempts)
            .bind(self.attempts)
            .bind(self.deferrals)
            .bind(self.delays_ms)
            .bind(self.started_at)
            .bind(self.finished_at)
            .bind(self.worker_ids)
            .bind(self.error_codes)
            .fetch_all(conn)
            .await
    }
}
