//! `/v1/schedules`: tasks created on a clock (docs/schedules.md).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::AppState;
use super::body::{
    Fields, JSON_TYPES, body_rejection, content_type, json_len, json_object, path_rejection,
    query_rejection, too_deep,
};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::tasks::SHORT_TEXT;
use tasker_shared::schedule::Schedule;
use tasker_shared::states::{CatchUp, Overlap};
use tasker_shared::store::schedules::{self, FireRecord, NextFire, ScheduleFields, ScheduleRecord};

/// Fire times a schedule's answer lists ahead.
const NEXT_RUNS: usize = 5;
/// Fires a schedule's answer lists back.
const LAST_RUNS: i64 = 10;

/// A schedule with its next fire times and its last fires.
#[derive(Serialize, ToSchema)]
pub(crate) struct ScheduleView {
    #[serde(flatten)]
    schedule: ScheduleRecord,
    /// Its next five fire times (none while paused).
    next_runs: Vec<DateTime<Utc>>,
    /// Its last ten fires, newest first.
    last_runs: Vec<FireRecord>,
}

/// A page of schedules.
#[derive(Serialize, ToSchema)]
pub(crate) struct ScheduleList {
    /// By name, each with its next fire times and last fires.
    schedules: Vec<ScheduleView>,
    /// The `cursor` of the next page; `null` on the last.
    next_cursor: Option<String>,
}

/// Schedules a page holds by default, and at most.
const PAGE: i64 = 100;
const MAX_PAGE: i64 = 500;

/// The body of `POST /v1/schedules` (documentation only: the handler reads the body by
/// hand, so that every problem is named at once).
#[derive(ToSchema)]
#[schema(example = json!({"name": "morning_report", "namespace": "reports",
    "template": "daily", "cron": "0 7 * * *", "timezone": "Europe/Paris",
    "context": {"format": "pdf"}, "overlap": "skip"}))]
#[expect(dead_code, reason = "documentation only")]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateScheduleRequest {
    /// Its name: letters, digits, `_`, `-` and `.`.
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_.-]+$")]
    name: String,
    /// The template's namespace.
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    namespace: String,
    /// The template's name.
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    template: String,
    /// The template's version; the newest at each fire when absent.
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    version: Option<String>,
    /// Five fields (minute hour day-of-month month day-of-week) or six (a second first).
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    cron: String,
    /// An IANA time zone name; `UTC` by default.
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    timezone: Option<String>,
    /// The context of each task (checked against the template's schema).
    context: Option<Value>,
    /// `allow` (default), `skip` or `cancel_previous`.
    overlap: Option<Overlap>,
    /// `none` (default), `latest` or `all`.
    catch_up: Option<CatchUp>,
    /// Created paused.
    paused: Option<bool>,
}

/// The fields a schedule is written with; `name` only on create.
const FIELDS: &[&str] = &[
    "name",
    "namespace",
    "template",
    "version",
    "cron",
    "timezone",
    "context",
    "overlap",
    "catch_up",
    "paused",
];

/// Create a schedule.
#[utoipa::path(
    post,
    path = "/v1/schedules",
    tag = "schedules",
    operation_id = "create_schedule",
    request_body(content = CreateScheduleRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The schedule, with its next five fire times.", body = ScheduleView),
        (status = 400, description = "`malformed_request`: the body is not a JSON object.", body = ErrorBody),
        (status = 409, description = "`schedule_exists`: the name is taken.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than `TASKER_MAX_BODY_BYTES` (a context larger than `TASKER_MAX_CONTEXT_BYTES` is a 422 naming it).", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`.", body = ErrorBody),
        (status = 422, description = "`invalid_schedule`: every problem by field: a bad cron or time zone, a template that is not registered, a context its schema refuses, an unknown field.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<ScheduleView>)> {
    let body = body.map_err(|rejection| body_rejection(rejection, &state.limits))?;
    content_type(&headers, JSON_TYPES)?;
    let mut fields = Fields::new(json_object(&body)?, FIELDS);
    let name = fields.string("name", true, SHORT_TEXT);
    if let Some(name) = &name
        && !valid_name(name)
    {
        fields.problem(
            "name",
            "a schedule name holds only letters, digits, `_`, `-` and `.`",
        );
    }
    let draft = Draft::read(&mut fields, true);
    let schedule = ScheduleFields {
        name: name.unwrap_or_default(),
        namespace: draft.namespace.clone().unwrap_or_default(),
        template: draft.template.clone().unwrap_or_default(),
        version: draft.version.clone(),
        cron: draft.cron.clone().unwrap_or_default(),
        timezone: draft.timezone.clone().unwrap_or_else(|| "UTC".to_owned()),
        context: draft.context.clone().unwrap_or_else(|| json!({})),
        overlap: draft.overlap.unwrap_or(Overlap::Allow),
        catch_up: draft.catch_up.unwrap_or(CatchUp::None),
        paused: draft.paused.unwrap_or(false),
    };
    let parsed = check(&state, &mut fields, &schedule, true).await?;
    fields.finish("invalid_schedule")?;
    let next = first_fire(parsed.as_ref(), &schedule);
    let created = state
        .db
        .bounded(|pool| schedules::create(pool, &schedule, next))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "schedule_exists",
                format!("a schedule named `{}` exists", schedule.name),
            )
        })?;
    tracing::info!(schedule = %created.fields.name, cron = %created.fields.cron, timezone = %created.fields.timezone,
        "schedule created");
    state.wake_scheduler.notify_one();
    Ok((StatusCode::CREATED, Json(view(&state, created).await?)))
}

/// Schedules by name, one page at a time, each with its next fire times and last fires.
#[utoipa::path(
    get,
    path = "/v1/schedules",
    tag = "schedules",
    operation_id = "list_schedules",
    params(
        ("namespace" = Option<String>, Query, description = "Only schedules of this template namespace."),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Schedules per page, 1 to 500; default 100. A page ends earlier, with a `next_cursor`, once its schedules' contexts pass 16 MiB of JSON together (the first schedule always comes)."),
        ("cursor" = Option<String>, Query, min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_.-]+$", description = "The `next_cursor` of the previous page (a schedule's name), sent with the same `namespace`."),
    ),
    responses(
        (status = 200, description = "One page of schedules.", body = ScheduleList),
        (status = 400, description = "`malformed_request`: every bad or unknown query parameter.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<ScheduleList>> {
    let Query(query) = query.map_err(query_rejection)?;
    let mut problems = Vec::new();
    let (mut namespace, mut cursor, mut limit) = (None, None, PAGE);
    let mut matches_nothing = false;
    for (key, value) in query {
        let mut problem = |message: String| {
            problems.push(json!({"path": key, "message": message}));
        };
        match key.as_str() {
            // No stored name holds U+0000 (nor can PostgreSQL compare with one).
            "namespace" if value.contains('\0') => matches_nothing = true,
            "namespace" => namespace = Some(value),
            "cursor" if value.len() > 128 || !valid_name(&value) => {
                problem("`cursor` must be a `next_cursor` from an earlier page".to_owned());
            }
            "cursor" => cursor = Some(value),
            "limit" => match value.parse::<i64>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                _ => problem(format!(
                    "`limit` must be a whole number from 1 to {MAX_PAGE}"
                )),
            },
            _ => problem(format!(
                "unknown query parameter `{key}`; expected namespace, limit or cursor"
            )),
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::malformed("invalid query parameters").with_details(problems));
    }
    if matches_nothing {
        return Ok(Json(ScheduleList {
            schedules: Vec::new(),
            next_cursor: None,
        }));
    }
    let (page, next_cursor) = state
        .db
        .bounded(|pool| schedules::page(pool, namespace.as_deref(), cursor.as_deref(), limit))
        .await?;
    let names: Vec<String> = page.iter().map(|s| s.fields.name.clone()).collect();
    let mut last_runs = state
        .db
        .bounded(|pool| schedules::last_runs_of(pool, &names, LAST_RUNS))
        .await?;
    let schedules = page
        .into_iter()
        .map(|schedule| ScheduleView {
            next_runs: next_runs(&schedule),
            last_runs: last_runs.remove(&schedule.fields.name).unwrap_or_default(),
            schedule,
        })
        .collect();
    Ok(Json(ScheduleList {
        schedules,
        next_cursor,
    }))
}

/// A schedule, with its next fire times and its last fires.
#[utoipa::path(
    get,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    operation_id = "get_schedule",
    params(("name" = String, Path, description = "The schedule's name.")),
    responses(
        (status = 200, description = "The schedule.", body = ScheduleView),
        (status = 404, description = "`schedule_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<ScheduleView>> {
    let Path(name) = path.map_err(path_rejection)?;
    let schedule = find(&state, &name).await?;
    Ok(Json(view(&state, schedule).await?))
}

/// Change a schedule: any field but its name. Pausing stops its fires; resuming fires
/// from the next fire time on (nothing of the paused time is caught up). A new cron or
/// time zone counts from now.
#[utoipa::path(
    patch,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    operation_id = "update_schedule",
    params(("name" = String, Path, description = "The schedule's name.")),
    request_body(content = UpdateScheduleRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The schedule as changed.", body = ScheduleView),
        (status = 400, description = "`malformed_request`: the body is not a JSON object.", body = ErrorBody),
        (status = 404, description = "`schedule_not_found`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than `TASKER_MAX_BODY_BYTES` (a context larger than `TASKER_MAX_CONTEXT_BYTES` is a 422 naming it).", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`.", body = ErrorBody),
        (status = 422, description = "`invalid_schedule`: every problem by field.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn update(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ScheduleView>> {
    let Path(name) = path.map_err(path_rejection)?;
    let body = body.map_err(|rejection| body_rejection(rejection, &state.limits))?;
    content_type(&headers, JSON_TYPES)?;
    let object = json_object(&body)?;
    // `"version": null` unpins: the newest version at each fire (absent keeps it).
    let unpinned = object.get("version").is_some_and(Value::is_null);
    // A pause alone is not checked against the template: a schedule whose template
    // went away, or whose context its schema no longer accepts, can still be paused.
    let pause_only = object.len() == 1 && object.get("paused") == Some(&Value::Bool(true));
    // Read, merged and written only if nobody changed it meanwhile (else again): two
    // changes at once both land.
    let mut tries = 0;
    let updated = loop {
        let current = find(&state, &name).await?;
        let mut fields = Fields::new(object.clone(), &FIELDS[1..]);
        let draft = Draft::read(&mut fields, false);
        let before = current.fields.clone();
        let schedule = ScheduleFields {
            name: before.name.clone(),
            namespace: draft.namespace.unwrap_or_else(|| before.namespace.clone()),
            template: draft.template.unwrap_or_else(|| before.template.clone()),
            version: match draft.version {
                Some(version) => Some(version),
                None if unpinned => None,
                None => before.version.clone(),
            },
            cron: draft.cron.unwrap_or_else(|| before.cron.clone()),
            timezone: draft.timezone.unwrap_or_else(|| before.timezone.clone()),
            context: draft.context.unwrap_or_else(|| before.context.clone()),
            overlap: draft.overlap.unwrap_or(before.overlap),
            catch_up: draft.catch_up.unwrap_or(before.catch_up),
            paused: draft.paused.unwrap_or(before.paused),
        };
        let parsed = check(&state, &mut fields, &schedule, !pause_only).await?;
        fields.finish("invalid_schedule")?;
        // The next fire stays unless the clock changed or the schedule was paused.
        let clock_changed = (schedule.cron.as_str(), schedule.timezone.as_str())
            != (before.cron.as_str(), before.timezone.as_str());
        let first = first_fire(parsed.as_ref(), &schedule);
        let next = if schedule.paused
            || clock_changed
            || before.paused
            || current.next_fire_at.is_none()
        {
            NextFire::Set(first)
        } else {
            NextFire::Keep(first)
        };
        if let Some(updated) = state
            .db
            .bounded(|pool| schedules::update(pool, &schedule, next, current.updated_at))
            .await?
        {
            break updated;
        }
        tries += 1;
        if tries == PATCH_TRIES {
            return Err(ApiError::overloaded(format!(
                "schedule `{}` changed {PATCH_TRIES} times while this change was made; try again",
                name.escape_default()
            )));
        }
    };
    tracing::info!(schedule = %updated.fields.name, paused = updated.fields.paused, "schedule changed");
    state.wake_scheduler.notify_one();
    Ok(Json(view(&state, updated).await?))
}

/// How often a change is merged again into a schedule that changed meanwhile.
const PATCH_TRIES: usize = 8;

/// Delete a schedule; the tasks it created stay.
#[utoipa::path(
    delete,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    operation_id = "delete_schedule",
    params(("name" = String, Path, description = "The schedule's name.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, description = "`schedule_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(name) = path.map_err(path_rejection)?;
    if name.contains('\0')
        || !state
            .db
            .bounded(|pool| schedules::delete(pool, &name))
            .await?
    {
        return Err(not_found(&name));
    }
    crate::scheduler::forget_schedule(&state.metrics, &name);
    tracing::info!(schedule = %name, "schedule deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `PATCH /v1/schedules/{name}` (documentation only): any field of a
/// schedule but its name.
#[derive(ToSchema)]
#[schema(example = json!({"paused": true}))]
#[expect(dead_code, reason = "documentation only")]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateScheduleRequest {
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    namespace: Option<String>,
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    template: Option<String>,
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    version: Option<String>,
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    cron: Option<String>,
    #[schema(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$")]
    timezone: Option<String>,
    context: Option<Value>,
    overlap: Option<Overlap>,
    catch_up: Option<CatchUp>,
    paused: Option<bool>,
}

/// The fields a request gave (each already checked for its type).
struct Draft {
    namespace: Option<String>,
    template: Option<String>,
    version: Option<String>,
    cron: Option<String>,
    timezone: Option<String>,
    context: Option<Value>,
    overlap: Option<Overlap>,
    catch_up: Option<CatchUp>,
    paused: Option<bool>,
}

impl Draft {
    /// Read the fields of a schedule but its name: a create (`requires`) must give the
    /// namespace, the template and the cron; given, none of them nor the time zone may be
    /// empty.
    fn read(fields: &mut Fields, requires: bool) -> Self {
        Draft {
            namespace: fields.non_empty_string("namespace", requires, SHORT_TEXT),
            template: fields.non_empty_string("template", requires, SHORT_TEXT),
            version: fields.string("version", false, SHORT_TEXT),
            cron: fields.non_empty_string("cron", requires, SHORT_TEXT),
            timezone: fields.non_empty_string("timezone", false, SHORT_TEXT),
            context: fields.value("context"),
            overlap: choice(fields, "overlap"),
            catch_up: choice(fields, "catch_up"),
            paused: flag(fields, "paused"),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// One of a text enum's names.
fn choice<T: std::str::FromStr + AllNames>(fields: &mut Fields, key: &str) -> Option<T> {
    let text = fields.string(key, false, SHORT_TEXT)?;
    match text.parse() {
        Ok(value) => Some(value),
        Err(_) => {
            fields.problem(
                key,
                format!(
                    "`{key}` is `{text}`; expected one of: {}",
                    T::names().join(", ")
                ),
            );
            None
        }
    }
}

/// The names a text enum takes.
trait AllNames {
    fn names() -> Vec<&'static str>;
}

impl AllNames for Overlap {
    fn names() -> Vec<&'static str> {
        Overlap::ALL.iter().map(|o| o.as_str()).collect()
    }
}

impl AllNames for CatchUp {
    fn names() -> Vec<&'static str> {
        CatchUp::ALL.iter().map(|c| c.as_str()).collect()
    }
}

fn flag(fields: &mut Fields, key: &str) -> Option<bool> {
    match fields.value(key)? {
        Value::Bool(flag) => Some(flag),
        Value::Null => None,
        other => {
            fields.problem(key, format!("`{key}` must be true or false, found {other}"));
            None
        }
    }
}

/// Check what a schedule would be written with: its cron and time zone, its context (an
/// object within the size limit) and, with `against_template`, its template (registered)
/// and its context against the template's schema. Every problem goes to `fields`;
/// returns the parsed schedule when it parses.
async fn check(
    state: &AppState,
    fields: &mut Fields,
    schedule: &ScheduleFields,
    against_template: bool,
) -> ApiResult<Option<Schedule>> {
    let parsed = if schedule.cron.is_empty() {
        None
    } else {
        match Schedule::parse(&schedule.cron, &schedule.timezone) {
            Ok(parsed) => Some(parsed),
            Err(problems) => {
                for (field, message) in problems {
                    fields.problem(field, message);
                }
                None
            }
        }
    };
    if !schedule.context.is_object() {
        fields.problem("context", "`context` must be a JSON object");
    } else if let Some(problem) = too_deep("context", &schedule.context) {
        fields.problem("context", problem);
    } else {
        let size = json_len(&schedule.context);
        let max = state.limits.max_context_bytes;
        if size > max {
            fields.problem(
                "context",
                format!("the context is {size} bytes; the limit is {max} bytes (TASKER_MAX_CONTEXT_BYTES)"),
            );
        }
    }
    if against_template && !schedule.namespace.is_empty() && !schedule.template.is_empty() {
        let resolved = state
            .db
            .bounded(|pool| {
                state.templates.resolve(
                    pool,
                    &schedule.namespace,
                    &schedule.template,
                    schedule.version.as_deref(),
                )
            })
            .await?;
        match resolved {
            None => fields.problem(
                "template",
                format!(
                    "no template {}/{}{} is registered",
                    schedule.namespace,
                    schedule.template,
                    schedule
                        .version
                        .as_deref()
                        .map(|v| format!(" version {v}"))
                        .unwrap_or_default()
                ),
            ),
            Some(resolved) if schedule.context.is_object() => {
                if let Err(problems) = resolved
                    .template
                    .definition
                    .validate_context(&schedule.context)
                {
                    for problem in problems {
                        fields.problem(&format!("context{}", problem.path), problem.message);
                    }
                }
            }
            Some(_) => {}
        }
    }
    Ok(parsed)
}

/// A new or resumed schedule's first fire: the next fire time from now.
fn first_fire(parsed: Option<&Schedule>, schedule: &ScheduleFields) -> Option<DateTime<Utc>> {
    if schedule.paused {
        return None;
    }
    parsed.and_then(|parsed| parsed.next_after(Utc::now()))
}

async fn find(state: &AppState, name: &str) -> ApiResult<ScheduleRecord> {
    if name.contains('\0') {
        return Err(not_found(name));
    }
    state
        .db
        .bounded(|pool| schedules::get(pool, name))
        .await?
        .ok_or_else(|| not_found(name))
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(
        "schedule_not_found",
        format!("no schedule `{}`", name.escape_default()),
    )
}

async fn view(state: &AppState, schedule: ScheduleRecord) -> ApiResult<ScheduleView> {
    let last_runs = state
        .db
        .bounded(|pool| schedules::last_runs(pool, &schedule.fields.name, LAST_RUNS))
        .await?;
    Ok(ScheduleView {
        next_runs: next_runs(&schedule),
        schedule,
        last_runs,
    })
}

/// A schedule's next [`NEXT_RUNS`] fire times (none while paused).
fn next_runs(schedule: &ScheduleRecord) -> Vec<DateTime<Utc>> {
    match (&schedule.next_fire_at, schedule.fields.paused) {
        (Some(next), false) => Schedule::parse(&schedule.fields.cron, &schedule.fields.timezone)
            .map(|parsed| {
                let mut runs = vec![*next];
                runs.extend(parsed.next_runs(*next, NEXT_RUNS - 1));
                runs
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}
