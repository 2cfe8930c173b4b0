//! Schedules: stored crons that create tasks, and the record of their fires.
//!
//! A fire time is handled once, whatever the number of coordinators: the one that finds
//! a schedule due locks its row ([`lock_due`], skipping rows another holds), creates the
//! tasks (idempotency key [`idempotency_key`]), then records the fires and moves
//! `next_fire_at` past now ([`record_fires`]) in the same transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::states::{CatchUp, Overlap, TaskStatus};
use crate::store::tasks::{Budgeted, budgeted_page, page_budget};

/// The fires kept per schedule.
pub const FIRES_KEPT: i64 = 100;

/// A schedule as stored: its fields, and its times.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ScheduleRecord {
    /// What it fires, when and how.
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub fields: ScheduleFields,
    /// `api`, or `template` (a template file's `schedules:`).
    pub source: String,
    /// The next fire time (none while paused).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// A schedule's fields: what it fires, when and how.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ScheduleFields {
    /// Its name (unique).
    pub name: String,
    /// The template's namespace.
    pub namespace: String,
    /// The template's name.
    pub template: String,
    /// The template's version; the newest at each fire when absent.
    pub version: Option<String>,
    /// Five fields (minute hour day-of-month month day-of-week), or six (a second first).
    pub cron: String,
    /// The IANA time zone the cron is read in.
    pub timezone: String,
    /// The context of each task it creates.
    pub context: Value,
    /// What a fire does while the previous fire's task runs.
    pub overlap: Overlap,
    /// Which fire times it runs when no coordinator ran at the time.
    pub catch_up: CatchUp,
    /// Whether it is paused (it fires nothing, and catches nothing up on resume).
    pub paused: bool,
}

/// One fire of a schedule, as its `last_runs` show it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct FireRecord {
    /// The fire time.
    pub time: DateTime<Utc>,
    /// The task it created (none when skipped, missed or failed).
    pub task_id: Option<Uuid>,
    /// `fired`, `skipped` (overlap), `missed` (catch-up) or `failed`.
    pub outcome: String,
    /// The task's status now (none when there is no task, or it was pruned).
    pub status: Option<TaskStatus>,
}

const COLUMNS: &str = "name, namespace, template, version, cron, timezone, context, overlap, \
     catch_up, paused, source, next_fire_at, created_at, updated_at";

/// The idempotency key of the task a schedule creates at `fire_at`.
pub fn idempotency_key(schedule: &str, fire_at: DateTime<Utc>) -> String {
    format!(
        "schedule:{schedule}:{}",
        fire_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

/// Create a schedule from the API, firing first at `next_fire_at`; `None` when the name
/// is taken.
pub async fn create(
    pool: &PgPool,
    fields: &ScheduleFields,
    next_fire_at: Option<DateTime<Utc>>,
) -> sqlx::Result<Option<ScheduleRecord>> {
    with_fields(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO schedules (name, namespace, template, version, cron, timezone, \
                                    context, overlap, catch_up, paused, next_fire_at, source) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'api') \
             ON CONFLICT (name) DO NOTHING RETURNING {COLUMNS}"
        ))),
        fields,
    )
    .bind(next_fire_at)
    .fetch_optional(pool)
    .await
}

/// Create or replace a template file's schedule, keeping whether it is paused and, when
/// its cron and time zone are unchanged, its next fire. A schedule of that name created
/// through the API is left alone: returns `false`.
pub async fn upsert_from_template(
    pool: &PgPool,
    fields: &ScheduleFields,
    next_fire_at: Option<DateTime<Utc>>,
) -> sqlx::Result<bool> {
    // A new one is not paused; one there keeps its pause ($10 is not written on update).
    let written: Option<(String,)> = with_fields(
        sqlx::query_as(
            "INSERT INTO schedules (name, namespace, template, version, cron, timezone, context, \
                                overlap, catch_up, paused, next_fire_at, source) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'template') \
         ON CONFLICT (name) DO UPDATE \
         SET namespace = EXCLUDED.namespace, template = EXCLUDED.template, \
             version = EXCLUDED.version, context = EXCLUDED.context, \
             next_fire_at = CASE WHEN schedules.paused THEN NULL \
                                 WHEN (schedules.cron, schedules.timezone) \
                                      = (EXCLUDED.cron, EXCLUDED.timezone) \
                                 THEN schedules.next_fire_at \
                                 ELSE EXCLUDED.next_fire_at END, \
             cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, updated_at = now() \
         WHERE schedules.source = 'template' RETURNING name",
        ),
        fields,
    )
    .bind(next_fire_at)
    .fetch_optional(pool)
    .await?;
    Ok(written.is_some())
}

/// `query` with a schedule's fields bound as `$1` to `$10`, in the table's order.
fn with_fields<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    fields: &'q ScheduleFields,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(&fields.name)
        .bind(&fields.namespace)
        .bind(&fields.template)
        .bind(&fields.version)
        .bind(&fields.cron)
        .bind(&fields.timezone)
        .bind(&fields.context)
        .bind(fields.overlap)
        .bind(fields.catch_up)
        .bind(fields.paused)
}

/// What a change to a schedule does to its next fire.
#[derive(Debug, Clone, Copy)]
pub enum NextFire {
    /// Left as stored: the scheduler may move it while the change is made, and must not
    /// see it set back to a time it has fired. When none is stored (a pause committed
    /// meanwhile), set to the time given.
    Keep(Option<DateTime<Utc>>),
    /// Set (the clock changed, or the schedule was paused or resumed).
    Set(Option<DateTime<Utc>>),
}

/// Replace a schedule's fields and set or keep its next fire, if it is still as it was
/// when read (`seen`: its `updated_at` then); `None` when it changed meanwhile or is gone.
/// A change merged into what was read so loses no concurrent change.
pub async fn update<'e>(
    db: impl PgExecutor<'e>,
    fields: &ScheduleFields,
    next: NextFire,
    seen: DateTime<Utc>,
) -> sqlx::Result<Option<ScheduleRecord>> {
    let (keep, next_fire_at) = match next {
        NextFire::Keep(otherwise) => (true, otherwise),
        NextFire::Set(at) => (false, at),
    };
    with_fields(
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE schedules SET namespace = $2, template = $3, version = $4, cron = $5, \
                    timezone = $6, context = $7, overlap = $8, catch_up = $9, paused = $10, \
                    next_fire_at = CASE WHEN $12 AND next_fire_at IS NOT NULL \
                                        THEN next_fire_at ELSE $11 END, \
                    updated_at = now() \
             WHERE name = $1 AND updated_at = $13 RETURNING {COLUMNS}"
        ))),
        fields,
    )
    .bind(next_fire_at)
    .bind(keep)
    .bind(seen)
    .fetch_optional(db)
    .await
}

/// Delete a schedule (its fires with it); `false` when there is none.
pub async fn delete(pool: &PgPool, name: &str) -> sqlx::Result<bool> {
    let deleted = sqlx::query("DELETE FROM schedules WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() == 1)
}

/// A schedule by name.
pub async fn get<'e>(db: impl PgExecutor<'e>, name: &str) -> sqlx::Result<Option<ScheduleRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules WHERE name = $1"
    )))
    .bind(name)
    .fetch_optional(db)
    .await
}

/// Schedules by name, one page at a time: at most `limit` of those after `cursor` (the
/// last name of the page before), only `namespace`'s when given; returns the page and the
/// next page's cursor. A page ends early, with a cursor, once its schedules' contexts
/// pass [`crate::store::tasks::MAX_PAGE_JSON_BYTES`] of JSON together (the first always
/// comes).
pub async fn page<'e>(
    db: impl PgExecutor<'e>,
    namespace: Option<&str>,
    cursor: Option<&str>,
    limit: i64,
) -> sqlx::Result<(Vec<ScheduleRecord>, Option<String>)> {
    // The page's schedules (one more, to know whether more follow), then only those whose
    // contexts, with those before them, fit in the budget: the first always.
    let (head, tail) = page_budget("context", "name", "ASC");
    let rows: Vec<Budgeted<ScheduleRecord>> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{head}SELECT {COLUMNS} FROM schedules \
         WHERE ($1::text IS NULL OR namespace = $1) AND ($2::text IS NULL OR name > $2) \
         ORDER BY name LIMIT $3{tail}"
    )))
    .bind(namespace)
    .bind(cursor)
    .bind(limit + 1)
    .fetch_all(db)
    .await?;
    let (schedules, more) = budgeted_page(rows, limit);
    let next = more
        .then(|| schedules.last().map(|s| s.fields.name.clone()))
        .flatten();
    Ok((schedules, next))
}

/// A schedule's last `n` fires, newest first, with their tasks' status.
pub async fn last_runs<'e>(
    db: impl PgExecutor<'e>,
    name: &str,
    n: i64,
) -> sqlx::Result<Vec<FireRecord>> {
    sqlx::query_as(
        "SELECT f.fire_at AS time, f.task_id, f.outcome, \
                (SELECT t.status FROM tasks t WHERE t.task_id = f.task_id) AS status \
         FROM schedule_fires f WHERE f.schedule = $1 ORDER BY f.fire_at DESC LIMIT $2",
    )
    .bind(name)
    .bind(n)
    .fetch_all(db)
    .await
}

/// The last `n` fires of each of the schedules `names`, newest first, with their tasks'
/// status: one statement for a page of schedules.
pub async fn last_runs_of<'e>(
    db: impl PgExecutor<'e>,
    names: &[String],
    n: i64,
) -> sqlx::Result<HashMap<String, Vec<FireRecord>>> {
    let rows: Vec<ScheduleFire> = sqlx::query_as(
        "SELECT f.schedule, f.fire_at AS time, f.task_id, f.outcome, \
                (SELECT t.status FROM tasks t WHERE t.task_id = f.task_id) AS status \
         FROM unnest($1::text[]) AS s(name) \
         CROSS JOIN LATERAL (SELECT * FROM schedule_fires f WHERE f.schedule = s.name \
                             ORDER BY f.fire_at DESC LIMIT $2) f \
         ORDER BY f.schedule, f.fire_at DESC",
    )
    .bind(names)
    .bind(n)
    .fetch_all(db)
    .await?;
    let mut runs: HashMap<String, Vec<FireRecord>> = HashMap::new();
    for row in rows {
        runs.entry(row.schedule).or_default().push(row.fire);
    }
    Ok(runs)
}

/// A row of [`last_runs_of`]: a fire, with its schedule's name.
#[derive(sqlx::FromRow)]
struct ScheduleFire {
    schedule: String,
    #[sqlx(flatten)]
    fire: FireRecord,
}

/// When the next schedule is due (possibly past), if any is not paused, and the
/// database's time now.
pub async fn next_due<'e>(
    db: impl PgExecutor<'e>,
) -> sqlx::Result<Option<(DateTime<Utc>, DateTime<Utc>)>> {
    let (next, now): (Option<DateTime<Utc>>, DateTime<Utc>) = sqlx::query_as(
        "SELECT min(next_fire_at), clock_timestamp() FROM schedules WHERE NOT paused",
    )
    .fetch_one(db)
    .await?;
    Ok(next.map(|next| (next, now)))
}

/// The database's time now (`clock_timestamp()`): the clock that decides which schedules
/// are due ([`lock_due`], by its transaction's `now()`).
pub async fn database_now(conn: &mut PgConnection) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(conn)
        .await
}

/// Lock up to `limit` due schedules, oldest fire first, skipping those another
/// coordinator holds and those named in `except`.
pub async fn lock_due(
    conn: &mut PgConnection,
    limit: i64,
    except: &[String],
) -> sqlx::Result<Vec<ScheduleRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules \
         WHERE NOT paused AND next_fire_at <= now() AND name <> ALL($2) \
         ORDER BY next_fire_at LIMIT $1 FOR UPDATE SKIP LOCKED"
    )))
    .bind(limit)
    .bind(except)
    .fetch_all(conn)
    .await
}

/// The task of a schedule's last fire, and its status, if it still exists.
pub async fn previous_task(
    conn: &mut PgConnection,
    name: &str,
) -> sqlx::Result<Option<(Uuid, TaskStatus)>> {
    sqlx::query_as(
        "SELECT t.task_id, t.status FROM schedule_fires f JOIN tasks t ON t.task_id = f.task_id \
         WHERE f.schedule = $1 AND f.outcome = 'fired' ORDER BY f.fire_at DESC LIMIT 1",
    )
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// The tasks already created for some fire times of schedule `name` of template
/// `namespace`/`template` (found by their idempotency keys), with their status: a fire
/// whose transaction did not commit (its coordinator died, or a later fire of the batch
/// failed) created its task all the same.
pub async fn tasks_fired(
    conn: &mut PgConnection,
    (namespace, template): (&str, &str),
    name: &str,
    times: &[DateTime<Utc>],
) -> sqlx::Result<HashMap<DateTime<Utc>, (Uuid, TaskStatus)>> {
    if times.is_empty() {
        return Ok(HashMap::new());
    }
    let keys: Vec<String> = times.iter().map(|at| idempotency_key(name, *at)).collect();
    let found: Vec<(String, Uuid, TaskStatus)> = sqlx::query_as(
        "SELECT idempotency_key, task_id, status FROM tasks \
         WHERE namespace = $1 AND name = $2 AND idempotency_key = ANY ($3)",
    )
    .bind(namespace)
    .bind(template)
    .bind(&keys)
    .fetch_all(conn)
    .await?;
    Ok(times
        .iter()
        .zip(&keys)
        .filter_map(|(at, key)| {
            found
                .iter()
                .find(|(found, _, _)| found == key)
                .map(|(_, task, status)| (*at, (*task, *status)))
        })
        .collect())
}

/// What became of one fire time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireOutcome {
    /// It created (or found) this task.
    Fired(Uuid),
    /// The previous task still ran (`overlap: skip`).
    Skipped,
    /// No coordinator ran at the time, and `catch_up` said not to run it.
    Missed,
    /// The task could not be created.
    Failed,
}

impl FireOutcome {
    fn as_str(self) -> &'static str {
        match self {
            FireOutcome::Fired(_) => "fired",
            FireOutcome::Skipped => "skipped",
            FireOutcome::Missed => "missed",
            FireOutcome::Failed => "failed",
        }
    }
}

/// Record a locked schedule's fires, move its next fire to `next_fire_at`, and keep its
/// last [`FIRES_KEPT`] fires, and the last that created a task however long ago (the
/// task `overlap` looks for: [`previous_task`]); with `keep_unrelayed` (lifecycle events
/// on), also those the events relay has not published yet.
pub async fn record_fires(
    conn: &mut PgConnection,
    name: &str,
    fires: &[(DateTime<Utc>, FireOutcome)],
    next_fire_at: Option<DateTime<Utc>>,
    keep_unrelayed: bool,
) -> sqlx::Result<()> {
    let times: Vec<DateTime<Utc>> = fires.iter().map(|(at, _)| *at).collect();
    let tasks: Vec<Option<Uuid>> = fires
        .iter()
        .map(|(_, outcome)| match outcome {
            FireOutcome::Fired(task) => Some(*task),
            _ => None,
        })
        .collect();
    let outcomes: Vec<&str> = fires.iter().map(|(_, outcome)| outcome.as_str()).collect();
    sqlx::query(
        "WITH fired AS ( \
             INSERT INTO schedule_fires (schedule, fire_at, task_id, outcome) \
             SELECT $1, f.fire_at, f.task_id, f.outcome \
             FROM unnest($2::TIMESTAMPTZ[], $3::UUID[], $4::TEXT[]) AS f(fire_at, task_id, outcome) \
             ON CONFLICT DO NOTHING) \
         UPDATE schedules SET next_fire_at = $5 WHERE name = $1",
    )
    .bind(name)
    .bind(&times)
    .bind(&tasks)
    .bind(&outcomes)
    .bind(next_fire_at)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM schedule_fires WHERE schedule = $1 AND fire_at < \
             (SELECT fire_at FROM schedule_fires WHERE schedule = $1 \
              ORDER BY fire_at DESC OFFSET $2 LIMIT 1) \
           AND NOT (outcome = 'fired' AND fire_at = \
                    (SELECT max(fire_at) FROM schedule_fires \
                     WHERE schedule = $1 AND outcome = 'fired')) \
           AND (NOT $3 OR transition_id <= \
                (SELECT last_transition_id FROM event_relay WHERE id = 1))",
    )
    .bind(name)
    .bind(FIRES_KEPT - 1)
    .bind(keep_unrelayed)
    .execute(conn)
    .await?;
    Ok(())
}
