//! `POST /v1/tasks`, `GET /v1/tasks/{task_id}`, `GET /v1/tasks`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::DateTime;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Connection as _;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::body::{
    Fields, JSON_TYPES, body_rejection, content_type, json_len, json_object, path_rejection,
    query_rejection, storable_object, storable_value, too_deep, too_large,
};
use super::bulk::ListTag;
use super::error::{ApiError, ApiResult, ErrorBody};
use tasker_shared::states::TaskStatus;
use tasker_shared::store::inspect::{self, ExecutionContext};
use tasker_shared::store::tasks::{
    self, ChildTask, Created, Creation, NewTask, Order, Page, StepRecord, TaskFilter, TaskRecord,
};
use tasker_shared::store::transitions::OperatorError;
use tasker_shared::template::{MAX_PRIORITY, Problem};

/// A task with its steps and its execution context.
#[derive(Serialize, ToSchema)]
pub(crate) struct TaskView {
    #[serde(flatten)]
    task: TaskRecord,
    /// The task's steps.
    steps: Vec<StepRecord>,
    /// The tasks its `tasker.task` steps started, oldest first.
    children: Vec<ChildTask>,
    /// Where the task stands: computed on read, absent from the answer to a create.
    #[serde(skip_serializing_if = "Option::is_none")]
    execution: Option<ExecutionContext>,
}

/// The body of `POST /v1/tasks` (documentation only: the handler reads the body by hand,
/// so that every problem is named at once; the fields it knows are [`CREATE_FIELDS`]).
#[derive(ToSchema)]
#[schema(example = json!({"namespace": "billing", "name": "charge",
    "context": {"order_id": 42}, "idempotency_key": "order-42"}))]
#[expect(dead_code, reason = "documentation only")]
// Unknown fields are refused (422): `additionalProperties: false` in the description.
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTaskRequest {
    /// The template's namespace.
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    namespace: String,
    /// The template's name.
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    name: String,
    /// The template's version; the highest by semver when absent.
    #[schema(max_length = 128, pattern = "^[^\\x00]*$")]
    version: Option<String>,
    /// The task's input, checked against the template's `context_schema`; default `{}`.
    #[schema(schema_with = storable_object)]
    context: Option<serde_json::Map<String, Value>>,
    /// Who asks.
    #[schema(max_length = 128, pattern = "^[^\\x00]*$")]
    initiator: Option<String>,
    /// Which system asks.
    #[schema(max_length = 128, pattern = "^[^\\x00]*$")]
    source_system: Option<String>,
    /// Why.
    #[schema(max_length = 128, pattern = "^[^\\x00]*$")]
    reason: Option<String>,
    /// Free-form tags (any JSON, usually a list of strings); default `[]`.
    #[schema(schema_with = storable_value)]
    tags: Option<Value>,
    /// Makes creation idempotent within the template's namespace and name: the same key
    /// again answers the existing task (200), or 409 if its version or context differ.
    #[schema(max_length = 255, pattern = "^[^\\x00]*$")]
    idempotency_key: Option<String>,
    /// Priority, 0 to 9: among ready steps, the higher is claimed first; the template's
    /// `priority` (default 5) when absent.
    #[schema(minimum = 0, maximum = 9)]
    priority: Option<i16>,
    /// Run the task's first steps no earlier than this (RFC 3339); the task is created
    /// now, `pending`. Not with `delay_ms`.
    run_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Run the task's first steps this many milliseconds from now (at most a year). Not
    /// with `run_at`.
    #[schema(minimum = 0, maximum = 31_622_400_000_i64)]
    delay_ms: Option<i64>,
    /// End the task in `error` (reason `deadline_exceeded`) if it has not finished by
    /// then (RFC 3339, in the future); its template's `timeout` may end it earlier.
    deadline: Option<chrono::DateTime<chrono::Utc>>,
    /// Steps not to run: each must be marked `skippable: true` in the template. They are
    /// `skipped`, and their dependents go on without them.
    bypass_steps: Option<Vec<String>>,
}

/// The fields of a create-task body.
pub(crate) const CREATE_FIELDS: &[&str] = &[
    "namespace",
    "name",
    "version",
    "context",
    "initiator",
    "source_system",
    "reason",
    "tags",
    "idempotency_key",
    "priority",
    "run_at",
    "delay_ms",
    "deadline",
    "bypass_steps",
];

/// Longest `delay_ms`, and furthest `run_at`: a year (366 days).
const MAX_DELAY_MS: i64 = 31_622_400_000;

/// The body of `GET /v1/tasks`.
#[derive(Serialize, ToSchema)]
pub(crate) struct TaskPage {
    /// Tasks, in the order asked (newest first by default).
    tasks: Vec<TaskRecord>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<Uuid>,
}

/// Longest `initiator`, `source_system` and `reason` (as tasker-engine), and longest
/// namespace, name or tag in a filter.
pub(crate) const SHORT_TEXT: usize = 128;

/// Why the query parameter `key` cannot name a namespace or template (1 to
/// [`SHORT_TEXT`] characters, no U+0000), or `None` when it can.
pub(crate) fn name_parameter_problem(key: &str, value: &str) -> Option<String> {
    (value.is_empty() || value.contains('\0') || value.chars().count() > SHORT_TEXT)
        .then(|| format!("`{key}` must be 1 to {SHORT_TEXT} characters without U+0000"))
}
/// Longest idempotency key.
const KEY_LENGTH: usize = 255;
/// Most tasks per page.
const MAX_PAGE: i64 = 500;
/// Most tags in a filter: `tag` parameters of a list, `tags` of a bulk action.
pub(crate) const MAX_TAGS: usize = 20;
/// Steps past which a task's ids and edges are prepared on a blocking thread.
const LARGE_TEMPLATE_STEPS: usize = 1_000;

/// Create a task from a template. Its span starts the task's trace.
///
/// With an `idempotency_key` already used for this template's namespace and name, the
/// existing task is answered (200) when its version and context are the same.
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    operation_id = "create_task",
    request_body(content = CreateTaskRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The task is created.", body = TaskView),
        (status = 200, description = "The task created earlier with the same idempotency key.", body = TaskView),
        (status = 400, description = "`malformed_request`: the body is not JSON or could not be read.", body = ErrorBody),
        (status = 404, description = "`template_not_found`.", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the key was used with another version or context.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than `TASKER_MAX_BODY_BYTES`; `context_too_large`: the context is larger than `TASKER_MAX_CONTEXT_BYTES`.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is sent as something other than JSON.", body = ErrorBody),
        (status = 422, description = "`invalid_request`: every field problem, including strings holding U+0000 (before the template is read). Otherwise every problem the template finds in one answer's `details`: each place the context breaks the template's schema, each `bypass_steps` entry that is no step (`unknown_step`) or not `skippable` (`not_skippable`), each first step's `when` that fails for this context (by step), each limit key that cannot be evaluated for this task (by step and key); the code names the first kind present: `invalid_context`, else `invalid_request`, else `invalid_condition`, else `invalid_limit_key`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
#[tracing::instrument(name = "create_task", skip_all,
    fields(namespace = tracing::field::Empty, name = tracing::field::Empty,
           task_id = tracing::field::Empty, trace_id = tracing::field::Empty))]
pub(crate) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    let body = body.map_err(|rejection| body_rejection(rejection, &state.limits))?;
    content_type(&headers, JSON_TYPES)?;
    let mut fields = Fields::new(json_object(&body)?, CREATE_FIELDS);
    let namespace = fields.string("namespace", true, SHORT_TEXT);
    let name = fields.string("name", true, SHORT_TEXT);
    let version = fields.string("version", false, SHORT_TEXT);
    let context = fields.value("context").unwrap_or_else(|| json!({}));
    if !context.is_object() {
        fields.problem("context", "`context` must be a JSON object");
    } else if let Some(problem) = too_deep("context", &context) {
        fields.problem("context", problem);
    }
    let new = Arc::new(NewTask {
        context,
        initiator: fields.string("initiator", false, SHORT_TEXT),
        source_system: fields.string("source_system", false, SHORT_TEXT),
        reason: fields.string("reason", false, SHORT_TEXT),
        tags: fields.value("tags").unwrap_or_else(|| json!([])),
        idempotency_key: fields.string("idempotency_key", false, KEY_LENGTH),
        priority: fields
            .integer("priority", 0, MAX_PRIORITY.into())
            .map(|priority| priority as i16),
        run_at: run_at(&mut fields),
        deadline: fields.timestamp("deadline"),
        bypass_steps: fields.string_list("bypass_steps", SHORT_TEXT, MAX_BYPASSED),
        trace_parent: tasker_shared::telemetry::traceparent(&tracing::Span::current()),
    });
    tasker_shared::telemetry::record_trace_id(&tracing::Span::current());
    if let Some(deadline) = new.deadline {
        if deadline <= chrono::Utc::now() {
            fields.problem(
                "deadline",
                format!("`deadline` {} has passed", deadline.to_rfc3339()),
            );
        } else if new.run_at.is_some_and(|run_at| deadline <= run_at) {
            fields.problem(
                "deadline",
                "`deadline` must be after the time the task runs (`run_at` or `delay_ms`)",
            );
        }
    }
    let checked = fields.finish("invalid_request");
    let (Some(namespace), Some(name)) = (namespace, name) else {
        checked?;
        return Err(ApiError::malformed("namespace and name are required"));
    };
    if let Err(error) = checked {
        // Only a request refused for the time it came at is judged as a repeat: one with
        // a malformed field (its version, context or key, say) is refused as it is.
        if error
            .problem_paths()
            .all(|path| ["deadline", "run_at", "delay_ms"].contains(&path))
        {
            return or_earlier(&state, (&namespace, &name), &new, version.as_deref(), error).await;
        }
        return Err(error);
    }
    let max = state.limits.max_context_bytes;
    let size = json_len(&new.context);
    if size > max {
        return Err(too_large(
            "context_too_large",
            "context",
            "the context",
            "TASKER_MAX_CONTEXT_BYTES",
            max,
            size,
        ));
    }
    let span = tracing::Span::current();
    span.record("namespace", namespace.as_str());
    span.record("name", name.as_str());

    // The first steps are claimed with the task and published from here, unless the
    // broker is away: then they wait, `pending`, for the dispatcher.
    let claim = state
        .publisher
        .connected()
        .then(|| state.publisher.lease_ms());
    // At most twice: a create that named no version is refused when a version was
    // registered since this coordinator last looked. It then reads the template from
    // the database, as a create did before templates were kept, and the second create
    // is not checked (a registration racing it may or may not count).
    let mut checked = true;
    let created = loop {
        let resolved = if checked {
            state
                .db
                .bounded(|pool| {
                    state
                        .templates
                        .resolve(pool, &namespace, &name, version.as_deref())
                })
                .await?
        } else {
            state
                .db
                .bounded(|pool| {
                    state
                        .templates
                        .reload(pool, &namespace, &name, version.as_deref())
                })
                .await?
        };
        let resolved = resolved.ok_or_else(|| {
            ApiError::not_found(
                "template_not_found",
                match &version {
                    Some(version) => {
                        format!("no template {namespace}/{name} version {version}")
                    }
                    None => format!("no template {namespace}/{name}"),
                },
            )
        })?;
        let template = resolved.template;
        // Checked whatever the context's problems, so that one answer names them all.
        let context_problems = template
            .definition
            .validate_context(&new.context)
            .err()
            .unwrap_or_default();
        let versions_known = resolved.versions_known.filter(|_| checked);
        // Ids and edges for a large template take milliseconds of CPU (linear in steps
        // and edges): off the async threads, so other requests go on meanwhile.
        let creation = if template.definition.steps.len() > LARGE_TEMPLATE_STEPS {
            let (template, new) = (template.clone(), new.clone());
            tokio::task::spawn_blocking(move || Creation::new(template, new, claim, versions_known))
                .await
                .map_err(ApiError::internal)?
        } else {
            Creation::new(template.clone(), new.clone(), claim, versions_known)
        };
        let creation = match creation {
            Ok(creation) if context_problems.is_empty() => Ok(creation),
            Ok(_) => Err(creation_problems(context_problems, Vec::new())),
            Err(problems) => Err(creation_problems(context_problems, problems)),
        };
        let creation = match creation {
            Ok(creation) => creation,
            Err(error) => {
                let names = (namespace.as_str(), name.as_str());
                return or_earlier(&state, names, &new, version.as_deref(), error).await;
            }
        };
        let leaves_work = template.definition.first_steps_leave_work();
        match create_detached(&state, creation, leaves_work).await? {
            Created::TemplateChanged if checked => checked = false,
            created => break created,
        }
    };
    match created {
        Created::New(task, steps, _) => {
            span.record("task_id", tracing::field::display(task.task_id));
            tracing::info!(task_id = %task.task_id, namespace = %task.namespace, name = %task.name, "task created");
            // As created: no second read. `execution` is computed on GET.
            Ok((
                StatusCode::CREATED,
                Json(TaskView {
                    task,
                    steps,
                    // A child starts once the creation committed: listed on GET.
                    children: Vec::new(),
                    execution: None,
                }),
            ))
        }
        Created::Existing(task) => earlier(&state, task, &new, version.as_deref()).await,
        // Only a checked create can be refused.
        Created::TemplateChanged => Err(ApiError::internal(anyhow::anyhow!(
            "an unchecked create of {namespace}/{name} was refused as stale"
        ))),
    }
}

/// One task with its steps.
#[utoipa::path(
    get,
    path = "/v1/tasks/{task_id}",
    tag = "tasks",
    operation_id = "get_task",
    params(("task_id" = Uuid, Path, description = "The task's id.")),
    responses(
        (status = 200, description = "The task, its steps and its execution context. The steps carry their results while those fit in 16 MiB of JSON together, taken in template order (a step whose results would pass it is left out, and later ones are still taken if they fit); a step left out has `results: null` and `results_omitted: true` (read it with `GET /v1/tasks/{task_id}/steps/{step_name}`).", body = TaskView),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID.", body = ErrorBody),
        (status = 404, description = "`task_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<TaskView>> {
    let Path(task_id) = task_id.map_err(path_rejection)?;
    let task_id = parse_task_id(&task_id)?;
    Ok(Json(task_view(&state, task_id).await?))
}

/// One step of a task, with its results whole.
#[utoipa::path(
    get,
    path = "/v1/tasks/{task_id}/steps/{step_name}",
    tag = "tasks",
    operation_id = "get_step",
    params(
        ("task_id" = Uuid, Path, description = "The task's id."),
        ("step_name" = String, Path, description = "The step's name: its name in the template, or an instance's (`load[3]`, encoded `load%5B3%5D`)."),
    ),
    responses(
        (status = 200, description = "The step, with its results.", body = StepRecord),
        (status = 400, description = "`malformed_request`: `task_id` is not a UUID.", body = ErrorBody),
        (status = 404, description = "`task_not_found` or `step_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn step(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Json<StepRecord>> {
    let Path((task_id, name)) = path.map_err(path_rejection)?;
    let task_id = parse_task_id(&task_id)?;
    // No step name holds U+0000 (nor can PostgreSQL compare with one).
    let found = match name.contains('\0') {
        true => None,
        false => {
            state
                .db
                .bounded(|pool| tasks::step(pool, task_id, &name))
                .await?
        }
    };
    match found {
        Some(step) => Ok(Json(step)),
        None if state
            .db
            .bounded(|pool| tasks::get(pool, task_id))
            .await?
            .is_none() =>
        {
            Err(OperatorError::TaskNotFound(task_id).into())
        }
        None => Err(OperatorError::StepNotFound {
            task_id,
            step: name.escape_debug().to_string(),
        }
        .into()),
    }
}

/// Tasks, filtered, one page at a time, newest or oldest first.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    operation_id = "list_tasks",
    params(
        ("namespace" = Option<String>, Query, description = "Only tasks of this template namespace."),
        ("name" = Option<String>, Query, description = "Only tasks of this template name."),
        ("status" = Option<TaskStatus>, Query, description = "Only tasks in this status."),
        ("tag" = Option<Vec<ListTag>>, Query, explode = true, max_items = 20, description = "Only tasks whose `tags` hold this tag; repeat it (`tag=a&tag=b`) for tasks holding all of them (at most 20). A tag holding U+0000 matches nothing."),
        ("created_after" = Option<DateTime<Utc>>, Query, description = "Only tasks created after this instant (RFC 3339; encode `+` as `%2B`)."),
        ("created_before" = Option<DateTime<Utc>>, Query, description = "Only tasks created before this instant (RFC 3339; encode `+` as `%2B`)."),
        ("order" = Option<String>, Query, pattern = "^-?created_at$", description = "`-created_at` (newest first, the default) or `created_at` (oldest first).", example = "-created_at"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Tasks per page, 1 to 500; default 50. A page ends earlier, with a `next_cursor`, once its tasks' contexts pass 16 MiB of JSON together (the first task always comes)."),
        ("cursor" = Option<Uuid>, Query, description = "The `next_cursor` of the previous page, sent with the same filters and order."),
    ),
    responses(
        (status = 200, description = "One page of tasks.", body = TaskPage),
        (status = 400, description = "`malformed_request`: every bad or unknown query parameter.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<TaskPage>> {
    let Query(query) = query.map_err(query_rejection)?;
    let mut problems = Vec::new();
    let mut matches_nothing = false;
    let mut filter = TaskFilter::default();
    let mut page = Page {
        cursor: None,
        limit: 50,
        order: Order::Newest,
    };
    let mut problem = |path: &str, message: String| {
        problems.push(json!({"path": path, "message": message}));
    };
    let mut tags_given = 0;
    for (key, value) in query {
        if key == "tag" {
            tags_given += 1;
            if tags_given == MAX_TAGS + 1 {
                problem("tag", format!("at most {MAX_TAGS} `tag` parameters"));
            }
        }
        match key.as_str() {
            "tag" if value.is_empty() || value.chars().count() > SHORT_TEXT => {
                problem("tag", format!("a tag must be 1 to {SHORT_TEXT} characters"));
            }
            // No stored name or tag holds U+0000 (nor can PostgreSQL compare with one).
            "namespace" | "name" | "tag" if value.contains('\0') => matches_nothing = true,
            "namespace" => filter.namespace = Some(value),
            "name" => filter.name = Some(value),
            "status" => match value.parse::<TaskStatus>() {
                Ok(status) => filter.statuses = vec![status],
                Err(_) => problem(
                    "status",
                    format!(
                        "unknown status `{value}`; expected one of: {}",
                        TaskStatus::ALL
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            },
            "tag" => filter.tags.push(value),
            "created_after" | "created_before" => match DateTime::parse_from_rfc3339(&value) {
                Ok(at) if key == "created_after" => filter.created_after = Some(at.to_utc()),
                Ok(at) => filter.created_before = Some(at.to_utc()),
                Err(error) => problem(
                    &key,
                    format!(
                        "`{key}` must be an RFC 3339 time such as 2026-12-01T00:00:00Z (encode `+` as %2B): {error}"
                    ),
                ),
            },
            "order" => match value.as_str() {
                "created_at" => page.order = Order::Oldest,
                "-created_at" => page.order = Order::Newest,
                _ => problem(
                    "order",
                    "`order` must be `created_at` (oldest first) or `-created_at` (newest first)"
                        .to_owned(),
                ),
            },
            "limit" => match value.parse::<i64>() {
                Ok(limit) if (1..=MAX_PAGE).contains(&limit) => page.limit = limit,
                _ => problem(
                    "limit",
                    format!("`limit` must be a whole number from 1 to {MAX_PAGE}"),
                ),
            },
            "cursor" => match Uuid::parse_str(&value) {
                Ok(cursor) => page.cursor = Some(cursor),
                Err(_) => problem(
                    "cursor",
                    "`cursor` must be a `next_cursor` from an earlier page".to_owned(),
                ),
            },
            _ => problem(
                &key,
                format!(
                    "unknown query parameter `{key}`; expected namespace, name, status, tag, \
                 created_after, created_before, order, limit or cursor"
                ),
            ),
        }
    }
    if let (Some(after), Some(before)) = (filter.created_after, filter.created_before)
        && after >= before
    {
        matches_nothing = true;
    }
    if !problems.is_empty() {
        return Err(ApiError::malformed("invalid query parameters").with_details(problems));
    }
    if matches_nothing {
        return Ok(Json(TaskPage {
            tasks: Vec::new(),
            next_cursor: None,
        }));
    }
    let (tasks, next_cursor) = state
        .db
        .bounded(|pool| tasks::list(pool, &filter, page))
        .await?;
    Ok(Json(TaskPage { tasks, next_cursor }))
}

pub(crate) fn parse_task_id(text: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(text).map_err(|error| {
        // Quote at most a little of what was sent: the answer stays small and readable.
        let shown: String = text
            .chars()
            .take(64)
            .collect::<String>()
            .escape_debug()
            .to_string();
        let more = if text.chars().count() > 64 { "..." } else { "" };
        ApiError::malformed(format!("`{shown}{more}` is not a task id (UUID): {error}"))
            .with_details(vec![json!({"path": "task_id", "message": "not a UUID"})])
    })
}

/// The task as `GET /v1/tasks/{task_id}` shows it: task, steps and execution context
/// read in one snapshot, so they never contradict each other.
pub(crate) async fn task_view(state: &AppState, task_id: Uuid) -> ApiResult<TaskView> {
    state
        .db
        .run(async |conn| {
            let (mut tx, task) = snapshot(conn, task_id).await?;
            let steps = tasks::steps_with_results(&mut tx, task_id).await?;
            let children = tasks::children(&mut *tx, task_id).await?;
            let execution = inspect::execution_context(&mut *tx, task_id).await?;
            tx.commit().await?;
            Ok(TaskView {
                task,
                steps,
                children,
                execution,
            })
        })
        .await
}

/// A read-only snapshot begun on `conn` (`REPEATABLE READ`), for reads that must agree with
/// each other, and the task `task_id` in it; 404 `task_not_found` without one.
pub(crate) async fn snapshot(
    conn: &mut sqlx::PgConnection,
    task_id: Uuid,
) -> ApiResult<(sqlx::Transaction<'_, sqlx::Postgres>, TaskRecord)> {
    let mut tx = conn
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let task = tasks::get(&mut *tx, task_id)
        .await?
        .ok_or_else(|| ApiError::not_found("task_not_found", format!("no task {task_id}")))?;
    Ok((tx, task))
}

/// The answer to a request repeated with an idempotency key: the task it created (200), or
/// 409 when the request differs from the first.
async fn earlier(
    state: &AppState,
    task: TaskRecord,
    new: &NewTask,
    version: Option<&str>,
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    // A request that named no version is the same request whichever version is the
    // newest now: only a version asked for must match.
    let other_version = version.is_some_and(|v| v != task.version);
    if !same_json(&task.context, &new.context) || other_version {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            format!(
                "idempotency_key was already used for task {} with a different version or context",
                task.task_id
            ),
        ));
    }
    Ok((StatusCode::OK, Json(task_view(state, task.task_id).await?)))
}

/// Whether `a` and `b` are the same JSON, numbers compared by value: `jsonb` stores
/// `1e16` as `10000000000000000`, which reads back as an integer where the request sent
/// a float.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i128(), y.as_i128()) {
            (Some(x), Some(y)) => x == y,
            // An integer and a float: equal only when the float is that whole number
            // (a float holds integers past 2^53 only roughly).
            (Some(i), None) => whole(y) == Some(i),
            (None, Some(i)) => whole(x) == Some(i),
            (None, None) => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(key, x)| y.get(key).is_some_and(|y| same_json(x, y)))
        }
        _ => a == b,
    }
}

/// The whole number a float is, if it is one.
fn whole(number: &serde_json::Number) -> Option<i128> {
    let float = number.as_f64()?;
    (float.fract() == 0.0 && float.abs() < 1e38).then_some(float as i128)
}

/// `error` (a 422), unless the request carries an idempotency key a task of this
/// template was created with: a repeated request is answered with that task, as if it
/// had been written, not judged again against what changed since (the newest version's
/// context schema, a deadline now past, a delay counted from now).
async fn or_earlier(
    state: &AppState,
    (namespace, name): (&str, &str),
    new: &NewTask,
    version: Option<&str>,
    error: ApiError,
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    let Some(key) = new.idempotency_key.as_deref() else {
        return Err(error);
    };
    if error.status() != StatusCode::UNPROCESSABLE_ENTITY {
        return Err(error);
    }
    // A look-up that fails answers the refusal, not the database's trouble.
    match state
        .db
        .bounded(|pool| tasks::find_by_idempotency_key(pool, namespace, name, key))
        .await
    {
        Ok(Some(task)) => earlier(state, task, new, version).await,
        _ => Err(error),
    }
}

/// Write `creation`, then carry out what its commit promised (publish the first steps
/// claimed with it, count it), in a task of its own: a client that hangs up while its
/// task is written drops its request, not the steps claimed for its task, which would
/// otherwise wait, claimed and unpublished, for their lease to run out. Answers the
/// creation without its dispatches, which are published.
async fn create_detached(
    state: &AppState,
    creation: Creation,
    leaves_work: bool,
) -> ApiResult<Created> {
    let carried = state.clone();
    state
        .effects
        .spawn(async move {
            match carried.creator.create(creation).await? {
                Created::New(task, steps, dispatches) => {
                    // What a first step leaves ready past the first batch is the dispatcher's.
                    crate::operations::Effects::created(&task, dispatches, leaves_work)
                        .carry_out(&carried)
                        .await;
                    Ok(Created::New(task, steps, Vec::new()))
                }
                created => Ok(created),
            }
        })
        .await
        .map_err(ApiError::internal)?
}

/// When to run a new task's first steps: `run_at`, or `delay_ms` from now; not both.
fn run_at(fields: &mut Fields) -> Option<chrono::DateTime<chrono::Utc>> {
    let at = fields.timestamp("run_at");
    let delay = fields.integer("delay_ms", 0, MAX_DELAY_MS);
    let now = chrono::Utc::now();
    match (at, delay) {
        (Some(_), Some(_)) => {
            fields.problem("delay_ms", "give `run_at` or `delay_ms`, not both");
            None
        }
        (Some(at), None) if at > now + chrono::TimeDelta::milliseconds(MAX_DELAY_MS) => {
            fields.problem("run_at", "`run_at` is more than a year away");
            None
        }
        (Some(at), None) => Some(at),
        (None, Some(ms)) => Some(now + chrono::TimeDelta::milliseconds(ms)),
        (None, None) => None,
    }
}

/// Most `bypass_steps`.
const MAX_BYPASSED: usize = 1_000;

/// The answer to a creation its template refuses for this task, every problem in its
/// details: the context breaks the schema (`invalid_context`, its problems first); else
/// steps it cannot bypass (`invalid_request`), a first step's condition that fails
/// (`invalid_condition`), or limit keys it cannot evaluate (`invalid_limit_key`), the
/// code naming the first kind found.
fn creation_problems(context: Vec<Problem>, problems: Vec<Problem>) -> ApiError {
    let count = context.len() + problems.len();
    let (code, message) = if !context.is_empty() {
        (
            "invalid_context",
            format!(
                "the context breaks the template's schema in {} place(s); {count} problem(s) in all",
                context.len()
            ),
        )
    } else if problems.iter().any(|p| p.path.starts_with("bypass_steps")) {
        (
            "invalid_request",
            format!("{count} problem(s) in the request"),
        )
    } else if problems.iter().any(|p| p.code == "expression_error") {
        (
            "invalid_condition",
            format!("{count} condition(s) of the template cannot be evaluated for this task"),
        )
    } else {
        (
            "invalid_limit_key",
            format!("{count} limit key(s) of the template cannot be evaluated for this task"),
        )
    };
    let details: Vec<Value> = context.iter().chain(&problems).map(|p| json!(p)).collect();
    ApiError::invalid(code, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_the_same_when_its_numbers_are_equal_in_value() {
        let same = |a: &str, b: &str| {
            same_json(
                &serde_json::from_str(a).unwrap(),
                &serde_json::from_str(b).unwrap(),
            )
        };
        // jsonb writes 1e16 as 10000000000000000.
        assert!(same(
            r#"{"n": 1e16, "m": [2.5]}"#,
            r#"{"n": 10000000000000000, "m": [2.5]}"#
        ));
        assert!(same("3.0", "3"));
        assert!(!same("2.5", "2"));
        // Past 2^53 a float is not the integer next to it.
        assert!(!same("9007199254740992.0", "9007199254740993"));
        assert!(!same(r#"{"a": 1}"#, r#"{"a": 1, "b": 2}"#));
        assert!(!same(r#"[1, 2]"#, r#"[2, 1]"#));
        assert!(!same(r#""1""#, "1"));
    }
}
