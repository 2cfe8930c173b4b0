//! `POST /v1/tasks/cancel` and `POST /v1/tasks/retry`: the single-task operator actions
//! applied to every task a filter matches.
//!
//! Nothing here writes a status: each task goes through the same guarded transition as
//! `POST /v1/tasks/{task_id}/cancel` or `/retry` (`operations::bulk_batch`, through
//! `transitions::cancel_task` and `transitions::retry_task`), so it is locked, checked and recorded in the history (and
//! so in the events) exactly as one cancelled or retried by hand. The matching tasks are
//! read first, oldest first, at most `limit`; they are then changed [`BATCH`] to a
//! transaction, so no transaction holds many task locks for long. A task that finished
//! or was retried meanwhile is refused by the transition's guard and counted as matched
//! but not changed.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::body::{Fields, JSON_TYPES, body_rejection, content_type, json_object, kind};
use super::error::{ApiResult, ErrorBody};
use super::tasks::{MAX_TAGS, SHORT_TEXT};
use crate::operations::{self, BulkAction as Action};
use tasker_shared::states::TaskStatus;
use tasker_shared::store::tasks::{self, TaskFilter};

/// Tasks acted on when the body names no `limit`.
pub(crate) const DEFAULT_LIMIT: i64 = 1_000;
/// The largest `limit`.
pub(crate) const MAX_LIMIT: i64 = 10_000;
/// Tasks changed per transaction.
const BATCH: usize = 100;

/// The bodies of `POST /v1/tasks/cancel` ([`BulkCancelRequest`]) and `POST
/// /v1/tasks/retry` ([`BulkRetryRequest`]), for the description only: read by hand, so
/// that every problem is named at once; the fields are [`BULK_FIELDS`]. They differ in
/// the statuses `status` may name. At least one of `namespace`, `name`, `status`, `tags`,
/// `created_after` and `created_before` is required: an empty filter is refused rather
/// than taken as "every task".
macro_rules! bulk_request {
    ($request:ident, $status:literal, $pattern:literal, $example:expr) => {
        #[derive(ToSchema)]
        #[schema(example = $example)]
        #[expect(dead_code, reason = "documentation only")]
        // Unknown fields are refused (422): `additionalProperties: false` in the description.
        #[serde(deny_unknown_fields)]
        pub(crate) struct $request {
            /// Only tasks of this template namespace.
            #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
            namespace: Option<String>,
            /// Only tasks of this template name.
            #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
            name: Option<String>,
            #[doc = $status]
            #[schema(value_type = Option<String>, pattern = $pattern)]
            status: Option<TaskStatus>,
            /// Only tasks whose `tags` hold every one of these (at most 20).
            #[schema(min_items = 1, max_items = 20)]
            tags: Option<Vec<FilterTag>>,
            /// Only tasks created after this instant (RFC 3339). With `created_before` at
            /// or before it, nothing matches.
            created_after: Option<DateTime<Utc>>,
            /// Only tasks created before this instant (RFC 3339).
            created_before: Option<DateTime<Utc>>,
            /// Most tasks acted on, oldest first: 1 to 10000; default 1000.
            #[schema(minimum = 1, maximum = 10000)]
            limit: Option<i64>,
            /// Only report what matches; change nothing. Default `false`.
            dry_run: Option<bool>,
            /// Why, for each task's transition history.
            #[schema(max_length = 1024, pattern = "^[^\\x00]*$")]
            reason: Option<String>,
        }
    };
}

/// A tag a filter matches: 1 to 128 characters (for the description only).
pub(crate) struct FilterTag;

impl utoipa::PartialSchema for FilterTag {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .min_length(Some(1))
            .max_length(Some(SHORT_TEXT))
            .pattern(Some("^[^\\x00]*$"))
            .into()
    }
}

impl ToSchema for FilterTag {}

/// A tag the task list matches: 1 to 128 characters. Unlike a bulk action's filter, a
/// list query may hold U+0000, as its `namespace` and `name` may: such a value matches
/// no stored task, and the page is empty.
pub(crate) struct ListTag;

impl utoipa::PartialSchema for ListTag {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .min_length(Some(1))
            .max_length(Some(SHORT_TEXT))
            .into()
    }
}

impl ToSchema for ListTag {}

bulk_request!(
    BulkCancelRequest,
    "Only tasks in this status: `pending` or `in_progress` (default: both).",
    "^(pending|in_progress)$",
    json!({"namespace": "billing", "status": "pending", "tags": ["nightly"],
        "created_after": "2026-12-01T00:00:00Z", "limit": 500, "dry_run": true})
);
bulk_request!(
    BulkRetryRequest,
    "Only tasks in this status: `error`, the only status a retry applies to.",
    "^error$",
    json!({"namespace": "billing", "tags": ["nightly"],
        "created_after": "2026-12-01T00:00:00Z", "limit": 500, "dry_run": true})
);

/// The fields of a bulk body.
pub(crate) const BULK_FIELDS: &[&str] = &[
    "namespace",
    "name",
    "status",
    "tags",
    "created_after",
    "created_before",
    "limit",
    "dry_run",
    "reason",
];

/// The fields that narrow the filter: at least one is required.
pub(crate) const FILTER_FIELDS: &[&str] = &[
    "namespace",
    "name",
    "status",
    "tags",
    "created_after",
    "created_before",
];

/// The answer of a bulk cancel or retry.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"matched": 2, "changed": 2, "has_more": false,
    "task_ids": ["019ae3c2-0000-7000-8000-000000000001", "019ae3c2-0000-7000-8000-000000000002"]}))]
pub(crate) struct BulkResult {
    /// Tasks the filter matched in a status the action applies to (at most `limit`).
    matched: usize,
    /// Tasks changed: 0 on a dry run; fewer than `matched` when some changed state
    /// between being matched and being reached.
    changed: usize,
    /// The changed tasks, oldest first; on a dry run, the matched ones.
    task_ids: Vec<Uuid>,
    /// More tasks match beyond `limit`: run the request again for them.
    has_more: bool,
}

impl Action {
    /// The statuses the action applies to.
    fn statuses(self) -> &'static [TaskStatus] {
        match self {
            Action::Cancel => &[TaskStatus::Pending, TaskStatus::InProgress],
            Action::Retry => &[TaskStatus::Error],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Action::Cancel => "cancel",
            Action::Retry => "retry",
        }
    }
}

/// What a bulk body asks.
struct Request {
    filter: TaskFilter,
    limit: i64,
    dry_run: bool,
    reason: Option<String>,
}

/// Read the body, naming every problem (422 `invalid_request`).
fn read_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    action: Action,
) -> ApiResult<Request> {
    let body = body.map_err(|rejection| body_rejection(rejection, &state.limits))?;
    content_type(headers, JSON_TYPES)?;
    let object = json_object(&body)?;
    // A criterion given, even a bad one (that is its own problem).
    let narrowed = FILTER_FIELDS
        .iter()
        .any(|key| object.get(*key).is_some_and(|value| !value.is_null()));
    let mut fields = Fields::new(object, BULK_FIELDS);
    let mut filter = TaskFilter {
        namespace: fields.non_empty_string("namespace", false, SHORT_TEXT),
        name: fields.non_empty_string("name", false, SHORT_TEXT),
        ..TaskFilter::default()
    };
    let applicable = action.statuses();
    filter.statuses = applicable.to_vec();
    match fields.value("status") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => match text.parse::<TaskStatus>() {
            Ok(status) if applicable.contains(&status) => {
                filter.statuses = vec![status];
            }
            _ => fields.problem(
                "status",
                format!(
                    "`status` must be {} for {}; found `{}`",
                    applicable
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(" or "),
                    action.name(),
                    text.escape_debug()
                ),
            ),
        },
        Some(other) => fields.problem(
            "status",
            format!("`status` must be a string, found {}", kind(&other)),
        ),
    }
    match fields.value("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.is_empty() => {
            fields.problem("tags", "`tags` must hold at least one tag");
        }
        Some(Value::Array(items)) if items.len() > MAX_TAGS => {
            fields.problem("tags", format!("`tags` holds more than {MAX_TAGS} tags"));
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::String(tag) if !tag.is_empty() && tag.chars().count() <= SHORT_TEXT => {
                        filter.tags.push(tag);
                    }
                    Value::String(_) => fields.problem(
                        &format!("tags/{i}"),
                        format!("a tag must be 1 to {SHORT_TEXT} characters"),
                    ),
                    other => fields.problem(
                        &format!("tags/{i}"),
                        format!("a tag must be a string, found {}", kind(&other)),
                    ),
                }
            }
        }
        Some(other) => fields.problem(
            "tags",
            format!("`tags` must be an array of strings, found {}", kind(&other)),
        ),
    }
    filter.created_after = instant(&mut fields, "created_after");
    filter.created_before = instant(&mut fields, "created_before");
    let limit = match fields.value("limit") {
        None | Some(Value::Null) => DEFAULT_LIMIT,
        // A whole number, however written (`500` or `500.0`, as JSON Schema's `integer`).
        Some(value) => match value.as_i64().or_else(|| {
            value
                .as_f64()
                .filter(|n| n.fract() == 0.0)
                .map(|n| n as i64)
        }) {
            Some(limit) if (1..=MAX_LIMIT).contains(&limit) => limit,
            _ => {
                fields.problem(
                    "limit",
                    format!("`limit` must be a whole number from 1 to {MAX_LIMIT}"),
                );
                DEFAULT_LIMIT
            }
        },
    };
    let dry_run = match fields.value("dry_run") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(dry_run)) => dry_run,
        Some(other) => {
            fields.problem(
                "dry_run",
                format!("`dry_run` must be true or false, found {}", kind(&other)),
            );
            false
        }
    };
    let reason = fields.string("reason", false, 1024);
    if !narrowed {
        fields.problem(
            "",
            "give at least one of namespace, name, status, tags, created_after and \
             created_before: an empty filter would act on every task",
        );
    }
    fields.finish("invalid_request")?;
    Ok(Request {
        filter,
        limit,
        dry_run,
        reason,
    })
}

/// An RFC 3339 instant field.
fn instant(fields: &mut Fields, key: &str) -> Option<DateTime<Utc>> {
    let text = fields.string(key, false, 64)?;
    match DateTime::parse_from_rfc3339(&text) {
        Ok(at) => Some(at.with_timezone(&Utc)),
        Err(error) => {
            fields.problem(
                key,
                format!("`{key}` must be an RFC 3339 time such as 2026-12-01T00:00:00Z: {error}"),
            );
            None
        }
    }
}

/// Cancel every pending or in-progress task the filter matches (at most `limit`, oldest
/// first), each exactly as `POST /v1/tasks/{task_id}/cancel` would.
#[utoipa::path(
    post,
    path = "/v1/tasks/cancel",
    tag = "operate",
    operation_id = "cancel_tasks",
    request_body(content = BulkCancelRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "What matched and what was cancelled.", body = BulkResult),
        (status = 400, description = "`malformed_request`: the body is not JSON.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than the limit.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body sent as something other than JSON.", body = ErrorBody),
        (status = 422, description = "`invalid_request`: every field problem, and an empty filter.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log. Batches done before the failure stay done.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<BulkResult>> {
    let request = read_request(&state, &headers, body, Action::Cancel)?;
    run(&state, request, Action::Cancel).await.map(Json)
}

/// Retry every task in `error` the filter matches (at most `limit`, oldest first), each
/// exactly as `POST /v1/tasks/{task_id}/retry` would.
#[utoipa::path(
    post,
    path = "/v1/tasks/retry",
    tag = "operate",
    operation_id = "retry_tasks",
    request_body(content = BulkRetryRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "What matched and what was retried.", body = BulkResult),
        (status = 400, description = "`malformed_request`: the body is not JSON.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than the limit.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body sent as something other than JSON.", body = ErrorBody),
        (status = 422, description = "`invalid_request`: every field problem, and an empty filter.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log. Batches done before the failure stay done.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn retry(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<BulkResult>> {
    let request = read_request(&state, &headers, body, Action::Retry)?;
    run(&state, request, Action::Retry).await.map(Json)
}

async fn run(state: &AppState, request: Request, action: Action) -> ApiResult<BulkResult> {
    // One more than the limit says whether more match.
    let mut ids = state
        .db
        .bounded(|pool| tasks::matching_ids(pool, &request.filter, request.limit + 1))
        .await?;
    let has_more = ids.len() as i64 > request.limit;
    ids.truncate(request.limit as usize);
    let matched = ids.len();
    if request.dry_run {
        return Ok(BulkResult {
            matched,
            changed: 0,
            task_ids: ids,
            has_more,
        });
    }
    let mut changed = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(BATCH) {
        let (done, effects) = state
            .db
            .bounded(|pool| {
                operations::bulk_batch(
                    pool,
                    chunk,
                    (action, &request.filter.statuses),
                    request.reason.as_deref(),
                    state.publisher.lease_ms(),
                )
            })
            .await?;
        effects.apply(state).await;
        changed.extend(done);
    }
    tracing::info!(
        action = action.name(),
        matched,
        changed = changed.len(),
        has_more,
        reason = ?request.reason,
        "bulk operator action"
    );
    Ok(BulkResult {
        matched,
        changed: changed.len(),
        task_ids: changed,
        has_more,
    })
}
