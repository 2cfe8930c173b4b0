//! Creating tasks and reading them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::messages::{SCHEMA_VERSION, StepMessage};
use crate::states::{StepStatus, TaskStatus};
use crate::store::templates::TemplateRecord;
use crate::store::transitions::Dispatch;

/// A task as the API shows it (without steps).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TaskRecord {
    /// The task's id (UUIDv7, so ids sort by creation).
    pub task_id: Uuid,
    /// Template namespace.
    pub namespace: String,
    /// Template name.
    pub name: String,
    /// Template version.
    pub version: String,
    /// Current status.
    pub status: TaskStatus,
    /// The caller's context.
    pub context: Value,
    /// Who asked for it.
    pub initiator: Option<String>,
    /// Which system asked for it.
    pub source_system: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// Free-form tags.
    pub tags: Value,
    /// The caller's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
}

/// A step as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StepRecord {
    /// The step's id.
    pub step_id: Uuid,
    /// Its name in the template.
    pub name: String,
    /// The handler that runs it.
    pub handler: String,
    /// Current status.
    pub status: StepStatus,
    /// Attempts made so far (the one running included).
    pub attempts: i32,
    /// Maximum attempts.
    pub retry_limit: i32,
    /// "Not now" answers so far (they spend no attempt).
    pub deferrals: i32,
    /// Whether failures are retried.
    pub retryable: bool,
    /// How long one attempt may run.
    pub timeout_ms: i64,
    /// Names of the steps it waits for.
    pub depends_on: Vec<String>,
    /// Its handler's output, once complete (or as resolved by an operator).
    pub results: Option<Value>,
    /// The last failure: `{"kind","message","code"?}`.
    pub last_error: Option<Value>,
    /// When the next attempt may start, while waiting for a retry.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the current or last attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
}

/// What a caller asks for when creating a task (already checked against the template).
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    /// The context.
    pub context: Value,
    /// Who asks.
    pub initiator: Option<String>,
    /// Which system asks.
    pub source_system: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// Tags (any JSON, usually a list of strings).
    pub tags: Value,
    /// Makes creation idempotent within the template's namespace and name.
    pub idempotency_key: Option<String>,
    /// The trace the task's spans belong to (W3C traceparent), when traces are on.
    pub trace_parent: Option<String>,
}

/// Whether a create made a new task or found the one with the same idempotency key.
#[derive(Debug)]
pub enum Created {
    /// A new task, with its steps as created, and the steps claimed with it (see
    /// [`create`]) for the caller to publish.
    New(TaskRecord, Vec<StepRecord>, Vec<Dispatch>),
    /// The task created earlier with the same idempotency key.
    Existing(TaskRecord),
    /// Nothing was written: the caller named no version, and the template's name no
    /// longer has `versions_known` versions (one was registered since it looked).
    /// Resolve the newest version again and retry.
    TemplateChanged,
}

/// The SQLSTATE `tasker_create_task` raises when the template's versions changed
/// (migration 0008).
const TEMPLATE_CHANGED: &str = "TK001";

const TASK_COLUMNS: &str = "task_id, namespace, name, version, status, context, initiator, \
     source_system, reason, tags, idempotency_key, created_at, updated_at, completed_at";

/// Create a task with all its steps and edges in one statement (`tasker_create_task`).
///
/// With `claim_lease_ms`, the steps without parents are claimed in the same statement, as
/// [`claim_ready`](crate::store::transitions::claim_ready) would (`enqueued`, attempt 1,
/// a dispatch token and a lease of that many milliseconds), and returned for the caller
/// to publish once this returns. Without it they stay `pending` for the dispatcher.
///
/// With `versions_known` (see [`Resolved`](crate::store::templates::Resolved)), the
/// statement first checks that the template's name still has that many versions, and
/// writes nothing when it has not ([`Created::TemplateChanged`]).
pub async fn create(
    pool: &PgPool,
    template: &TemplateRecord,
    new: &NewTask,
    claim_lease_ms: Option<i64>,
    versions_known: Option<i32>,
) -> sqlx::Result<Created> {
    let definition = &template.definition;
    let task_id = Uuid::now_v7();
    let step_ids: Vec<Uuid> = definition.steps.iter().map(|_| Uuid::now_v7()).collect();
    let tokens: Vec<Option<Uuid>> = definition
        .steps
        .iter()
        .map(|step| (claim_lease_ms.is_some() && step.depends_on.is_empty()).then(Uuid::new_v4))
        .collect();
    let index_of = |name: &str| definition.steps.iter().position(|s| s.name == name);
    let (mut edge_from, mut edge_to) = (Vec::new(), Vec::new());
    for (child, step) in definition.steps.iter().enumerate() {
        for parent in &step.depends_on {
            // The template was validated: every dependency names a step.
            if let Some(parent) = index_of(parent) {
                edge_from.push(step_ids[parent]);
                edge_to.push(step_ids[child]);
            }
        }
    }
    let steps = &definition.steps;
    // One call: the insert's plan is made once per connection (migrations 0006, 0008).
    let inserted: sqlx::Result<Option<TaskRecord>> = sqlx::query_as(
        r#"
        SELECT task_id, namespace, name, version, status, context, initiator, source_system,
               reason, tags, idempotency_key, created_at, updated_at, completed_at
        FROM tasker_create_task($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                                $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26,
                                $27, $28, $29, $30)
        "#,
    )
    .bind(task_id)
    .bind(template.template_id)
    .bind(&definition.namespace)
    .bind(&definition.name)
    .bind(&definition.version)
    .bind(&new.context)
    .bind(&new.initiator)
    .bind(&new.source_system)
    .bind(&new.reason)
    .bind(&new.tags)
    .bind(&new.idempotency_key)
    .bind(&new.trace_parent)
    .bind(&step_ids)
    .bind(steps.iter().map(|s| s.name.clone()).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.handler.clone()).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.config.clone()).collect::<Vec<_>>())
    .bind(
        steps
            .iter()
            .map(|s| s.depends_on.len() as i32)
            .collect::<Vec<_>>(),
    )
    .bind(steps.iter().map(|s| s.retry_limit).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.retryable).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.timeout_ms).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.backoff.base_ms).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.backoff.max_ms).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.backoff.jitter).collect::<Vec<_>>())
    .bind(
        steps
            .iter()
            .map(|s| serde_json::json!(s.backoff.schedule_ms))
            .collect::<Vec<_>>(),
    )
    .bind(steps.iter().map(|s| s.max_deferrals).collect::<Vec<_>>())
    .bind(&edge_from)
    .bind(&edge_to)
    .bind(&tokens)
    .bind(claim_lease_ms)
    .bind(versions_known)
    .fetch_optional(pool)
    .await;
    let inserted = match inserted {
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some(TEMPLATE_CHANGED) => {
            return Ok(Created::TemplateChanged);
        }
        other => other?,
    };

    match inserted {
        Some(task) => {
            // The steps as just inserted, built here rather than read back: creating a
            // task costs one statement.
            let mut created = Vec::with_capacity(steps.len());
            let mut dispatches = Vec::new();
            for ((step, step_id), token) in steps.iter().zip(&step_ids).zip(&tokens) {
                created.push(StepRecord {
                    step_id: *step_id,
                    name: step.name.clone(),
                    handler: step.handler.clone(),
                    status: if token.is_some() {
                        StepStatus::Enqueued
                    } else {
                        StepStatus::Pending
                    },
                    attempts: i32::from(token.is_some()),
                    retry_limit: step.retry_limit,
                    deferrals: 0,
                    retryable: step.retryable,
                    timeout_ms: step.timeout_ms,
                    // In template order, as reading the task back lists them.
                    depends_on: {
                        let mut parents = step.depends_on.clone();
                        parents.sort_by_key(|parent| index_of(parent));
                        parents
                    },
                    results: None,
                    last_error: None,
                    next_attempt_at: None,
                    started_at: None,
                    completed_at: None,
                });
                let Some(dispatch_token) = *token else {
                    continue;
                };
                dispatches.push(Dispatch {
                    trace_parent: new.trace_parent.clone(),
                    message: StepMessage {
                        schema_version: SCHEMA_VERSION,
                        task_id: task.task_id,
                        step_id: *step_id,
                        step_name: step.name.clone(),
                        namespace: task.namespace.clone(),
                        template: format!("{}@{}", task.name, task.version),
                        handler: step.handler.clone(),
                        config: step.config.clone(),
                        context: task.context.clone(),
                        parents: Default::default(),
                        attempt: 1,
                        retry_limit: step.retry_limit,
                        deferrals: 0,
                        dispatch_token,
                        timeout_ms: step.timeout_ms,
                        // The creating transaction's time, as the claim's `now()`.
                        dispatched_at: task.created_at,
                    },
                });
            }
            Ok(Created::New(task, created, dispatches))
        }
        None => {
            let key = new.idempotency_key.as_deref().unwrap_or_default();
            let existing =
                find_by_idempotency_key(pool, &definition.namespace, &definition.name, key)
                    .await?
                    .ok_or(sqlx::Error::RowNotFound)?;
            Ok(Created::Existing(existing))
        }
    }
}

async fn find_by_idempotency_key(
    pool: &PgPool,
    namespace: &str,
    name: &str,
    key: &str,
) -> sqlx::Result<Option<TaskRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE namespace = $1 AND name = $2 AND idempotency_key = $3"
    )))
    .bind(namespace)
    .bind(name)
    .bind(key)
    .fetch_optional(pool)
    .await
}

/// One task.
pub async fn get<'e>(db: impl PgExecutor<'e>, task_id: Uuid) -> sqlx::Result<Option<TaskRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = $1"
    )))
    .bind(task_id)
    .fetch_optional(db)
    .await
}

/// A task's steps in template order, each with the names of its parents.
pub async fn steps<'e>(db: impl PgExecutor<'e>, task_id: Uuid) -> sqlx::Result<Vec<StepRecord>> {
    sqlx::query_as(
        r#"
        SELECT s.step_id, s.name, s.handler, s.status, s.attempts, s.retry_limit, s.deferrals,
               s.retryable,
               s.timeout_ms, s.results, s.last_error, s.next_attempt_at, s.started_at,
               s.completed_at,
               ARRAY(SELECT p.name FROM step_edges e JOIN steps p ON p.step_id = e.from_step
                     WHERE e.to_step = s.step_id ORDER BY p.position) AS depends_on
        FROM steps s
        WHERE s.task_id = $1
        ORDER BY s.position
        "#,
    )
    .bind(task_id)
    .fetch_all(db)
    .await
}

/// Filters for [`list`].
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this template name.
    pub name: Option<String>,
    /// Only this status.
    pub status: Option<TaskStatus>,
    /// Only tasks older than this one (the cursor).
    pub before: Option<Uuid>,
    /// At most this many.
    pub limit: i64,
}

/// Tasks, newest first, one page at a time: returns the page and the cursor of the next.
pub async fn list(
    pool: &PgPool,
    filter: &TaskFilter,
) -> sqlx::Result<(Vec<TaskRecord>, Option<Uuid>)> {
    let mut tasks: Vec<TaskRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks
         WHERE ($1::text IS NULL OR namespace = $1)
           AND ($2::text IS NULL OR name = $2)
           AND ($3::text IS NULL OR status = $3)
           AND ($4::uuid IS NULL OR task_id < $4)
         ORDER BY task_id DESC
         LIMIT $5"
    )))
    .bind(&filter.namespace)
    .bind(&filter.name)
    .bind(filter.status)
    .bind(filter.before)
    .bind(filter.limit + 1)
    .fetch_all(pool)
    .await?;
    let next = if tasks.len() as i64 > filter.limit {
        tasks.truncate(filter.limit as usize);
        tasks.last().map(|t| t.task_id)
    } else {
        None
    };
    Ok((tasks, next))
}
