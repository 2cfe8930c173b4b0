//! `POST /v1/templates`, `GET /v1/templates`, `GET /v1/templates/{namespace}/{name}`.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::AppState;
use super::body::{
    TEMPLATE_TYPES, body_rejection, content_type, nul_pointers, path_rejection, query_rejection,
    too_large,
};
use super::error::{ApiError, ApiResult, ErrorBody};
use tasker_shared::broker::{conflict_advice, is_queue_conflict};
use tasker_shared::store::templates::{self, Registered, TemplateRecord, TemplateSummary};
use tasker_shared::template::{
    ParsedTemplate, Problem, TemplateDefinition, TemplateLimits, codes,
    parse_template_with_warnings,
};

/// A template document, in YAML or JSON (documentation only: the handler parses the text
/// itself, so that every problem is named at once).
///
/// Two formats are read. The project format: `namespace`, `name`, `version` (default
/// `0.1.0`), `description`, `context_schema` (a JSON Schema for task contexts),
/// `defaults` and `steps` (each with `name`, `handler`, `depends_on`, `retryable`,
/// `retry_limit`, `timeout_ms`, `backoff`, `max_deferrals`, `config`, `skippable`,
/// `dependent_system`, `description`). And tasker-engine 1.x's format (`namespace_name`,
/// `task_handler_class`, `step_templates`, `environments`, ...), with the coordinator's
/// environment applied. Unknown keys are problems in the project format, and warnings in
/// a tasker-engine file (as tasker-engine ignored them).
#[derive(ToSchema)]
#[schema(example = json!({"namespace": "billing", "name": "charge", "version": "1.0.0",
    "steps": [{"name": "authorize", "handler": "Billing::Authorize"},
              {"name": "capture", "handler": "Billing::Capture", "depends_on": ["authorize"]}]}))]
#[expect(dead_code, reason = "documentation only")]
pub(crate) struct TemplateDocument(serde_json::Map<String, Value>);

/// The answer to `POST /v1/templates`: the stored template, and what in the document was
/// accepted without being used.
#[derive(Serialize, ToSchema)]
pub(crate) struct TemplateRegistration {
    /// The template as stored.
    #[serde(flatten)]
    template: TemplateRecord,
    /// Keys and values of a tasker-engine file that Tasker accepts and does not act on
    /// (unknown keys, `custom_events`, a task handler's `handler_config`,
    /// `concurrent: false`, an override of a step that does not exist), each with its
    /// `path`, `code` (`unknown_key` or `ignored`) and `message`. Absent when there are
    /// none; project-format files have none (their unknown keys are problems).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<TemplateWarning>,
}

/// Something accepted in a template without being used.
#[derive(Serialize, ToSchema)]
pub(crate) struct TemplateWarning {
    /// Where, such as `custom_events` or `step_templates[2].retry_policy`.
    path: String,
    /// `unknown_key` or `ignored`.
    code: String,
    /// What is ignored, and why.
    message: String,
}

impl From<Problem> for TemplateWarning {
    fn from(problem: Problem) -> Self {
        TemplateWarning {
            path: problem.path,
            code: problem.code,
            message: problem.message,
        }
    }
}

/// The body of `GET /v1/templates`: a page of templates.
#[derive(Serialize, ToSchema)]
pub(crate) struct TemplateList {
    /// Every version of each template of the page, by namespace, name and version
    /// (semver).
    templates: Vec<TemplateSummary>,
    /// The `cursor` of the next page; `null` on the last.
    next_cursor: Option<String>,
}

/// Templates a page holds by default, and at most (each with all its versions).
const PAGE: i64 = 100;
const MAX_PAGE: i64 = 500;

/// Register a template from a YAML or JSON body.
///
/// Registering the identical template again answers 200 with the stored one; the same
/// `namespace/name/version` with another definition is a conflict.
#[utoipa::path(
    post,
    path = "/v1/templates",
    tag = "templates",
    operation_id = "create_template",
    request_body(
        description = "A template document, in YAML or JSON.",
        content(
            (TemplateDocument = "application/yaml"),
            (TemplateDocument = "application/json"),
        ),
    ),
    responses(
        (status = 201, description = "The template is registered; `warnings` lists what a tasker-engine file holds that is accepted and not used.", body = TemplateRegistration),
        (status = 200, description = "The identical template was already registered.", body = TemplateRegistration),
        (status = 400, description = "`malformed_request`: the body is not UTF-8, YAML or JSON, could not be read, or expands to more than 250,000 values or 16 MiB of text (YAML aliases counted at each use); `details` has the problems, code `syntax`.", body = ErrorBody),
        (status = 409, description = "`template_conflict`: this version is registered with another definition; `queue_conflict`: the namespace's step queue exists with other arguments than Tasker declares (nothing is stored).", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is larger than `TASKER_MAX_BODY_BYTES`; `template_too_large`: larger than `TASKER_MAX_TEMPLATE_BYTES`.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is sent as something other than YAML, JSON or text.", body = ErrorBody),
        (status = 422, description = "`invalid_template`: every problem in the template, each with `path`, `code` and `message` (more steps than `TASKER_MAX_TEMPLATE_STEPS` is the one problem `too_many_steps`; configs larger together than `TASKER_MAX_TEMPLATE_BYTES` once aliases are expanded, `config_too_large`).", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<TemplateRegistration>)> {
    let body = body.map_err(|rejection| body_rejection(rejection, &state.limits))?;
    content_type(&headers, TEMPLATE_TYPES)?;
    let limits = state.limits;
    if body.len() > limits.max_template_bytes {
        return Err(too_large(
            "template_too_large",
            "",
            "the template",
            "TASKER_MAX_TEMPLATE_BYTES",
            limits.max_template_bytes,
            body.len(),
        ));
    }
    let template_limits = TemplateLimits {
        max_steps: limits.max_template_steps,
        max_config_bytes: limits.max_template_bytes,
    };
    // Parsing and validating a large document takes a CPU for a while (up to the
    // parser's expansion limits): off the async threads, so other requests go on.
    let environment = state.environment.clone();
    let parsed = tokio::task::spawn_blocking(move || {
        let text = std::str::from_utf8(&body)
            .map_err(|error| format!("the body is not UTF-8: {error}"))?;
        Ok::<_, String>(parse_template_with_warnings(
            text,
            &environment,
            template_limits,
        ))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::malformed)?;
    let definition = parsed.map_err(|error| {
        let details: Vec<Value> = error.0.iter().map(|p| json!(p)).collect();
        if error.0.iter().all(|p| p.code == codes::SYNTAX) {
            ApiError::malformed("the body is not valid YAML or JSON").with_details(details)
        } else if error.0.iter().any(|p| p.code == codes::TOO_MANY_STEPS) {
            ApiError::invalid(
                "invalid_template",
                format!(
                    "the template has more steps than this coordinator accepts: at most {} \
                         (TASKER_MAX_TEMPLATE_STEPS)",
                    limits.max_template_steps
                ),
                details,
            )
        } else if error.0.iter().any(|p| p.code == codes::CONFIG_TOO_LARGE) {
            ApiError::invalid(
                "invalid_template",
                format!(
                    "the steps' configs expand to more than this coordinator accepts: at \
                         most {} bytes together (TASKER_MAX_TEMPLATE_BYTES)",
                    limits.max_template_bytes
                ),
                details,
            )
        } else {
            ApiError::invalid(
                "invalid_template",
                format!("the template has {} problem(s)", details.len()),
                details,
            )
        }
    })?;
    let ParsedTemplate {
        definition,
        warnings,
    } = definition;
    refuse_nul(&definition)?;
    let (status, record) = register_template(&state, &definition).await?;
    for warning in &warnings {
        tracing::warn!(namespace = %definition.namespace, name = %definition.name,
            version = %definition.version, path = %warning.path, code = %warning.code,
            "template key accepted and not used: {}", warning.message);
    }
    Ok((
        status,
        Json(TemplateRegistration {
            template: record,
            warnings: warnings.into_iter().map(TemplateWarning::from).collect(),
        }),
    ))
}

/// 422 when a string of the template (a description, a config value or key) holds
/// U+0000, which PostgreSQL's `jsonb` cannot store. The paths are JSON pointers into the
/// normalised template (`/steps/0/config/key`).
fn refuse_nul(definition: &TemplateDefinition) -> ApiResult<()> {
    let value = serde_json::to_value(definition).map_err(ApiError::internal)?;
    let pointers = nul_pointers(&value, "");
    if pointers.is_empty() {
        return Ok(());
    }
    let details = pointers
        .iter()
        .map(|pointer| {
            json!({"path": pointer, "code": codes::INVALID_VALUE,
                   "message": "holds a NUL character (U+0000), which cannot be stored"})
        })
        .collect();
    Err(ApiError::invalid(
        "invalid_template",
        "the template holds NUL characters (U+0000), which cannot be stored",
        details,
    ))
}

/// Store a validated template; a new namespace gets its queue and is announced to workers.
/// Used by the API and by `TASKER_TEMPLATES_DIR` loading.
pub(crate) async fn register_template(
    state: &AppState,
    definition: &TemplateDefinition,
) -> ApiResult<(StatusCode, TemplateRecord)> {
    if definition.schedules.is_empty() {
        return register_version(state, definition).await;
    }
    // A file's schedules are written on their own: they are not part of the version, so
    // changing one needs no new version.
    let mut stored = definition.clone();
    let schedules = std::mem::take(&mut stored.schedules);
    let registered = register_version(state, &stored).await?;
    apply_schedules(state, &stored, &schedules).await?;
    Ok(registered)
}

/// Write a template file's schedules: each fires the newest version of the template,
/// with the file's context. One of the same name created through the API is left as it
/// is (a warning says so).
async fn apply_schedules(
    state: &AppState,
    definition: &TemplateDefinition,
    list: &[tasker_shared::template::TemplateSchedule],
) -> ApiResult<()> {
    use tasker_shared::schedule::Schedule;
    use tasker_shared::states::{CatchUp, Overlap};
    use tasker_shared::store::schedules::{self, ScheduleFields};
    for schedule in list {
        let timezone = schedule
            .timezone
            .clone()
            .unwrap_or_else(|| "UTC".to_owned());
        let next = Schedule::parse(&schedule.cron, &timezone)
            .ok()
            .and_then(|parsed| parsed.next_after(chrono::Utc::now()));
        let fields = ScheduleFields {
            name: schedule.name.clone(),
            namespace: definition.namespace.clone(),
            template: definition.name.clone(),
            version: None,
            cron: schedule.cron.clone(),
            timezone,
            context: schedule
                .context
                .clone()
                .unwrap_or_else(|| serde_json::json!({})),
            overlap: Overlap::Allow,
            catch_up: CatchUp::None,
            paused: false,
        };
        if state
            .db
            .bounded(|pool| schedules::upsert_from_template(pool, &fields, next))
            .await?
        {
            tracing::info!(schedule = %fields.name, namespace = %fields.namespace,
                template = %fields.template, cron = %fields.cron, "schedule loaded from template");
        } else {
            tracing::warn!(schedule = %fields.name,
                "a schedule of this name was created through the API; the template's is ignored");
        }
    }
    state.wake_scheduler.notify_one();
    Ok(())
}

/// Store one template version, or find it stored.
async fn register_version(
    state: &AppState,
    definition: &TemplateDefinition,
) -> ApiResult<(StatusCode, TemplateRecord)> {
    // The namespace's step queue, declared before the template is stored: a queue the
    // broker refuses to declare (one of another type or with other arguments) would
    // refuse every step of the template, dispatched again at every sweep. A broker away
    // now is no reason to refuse: the queue is declared before the first publish to it.
    if state.publisher.connected()
        && let Err(error) = state
            .publisher
            .ensure_namespace(&definition.namespace)
            .await
        && is_queue_conflict(&error)
    {
        let queue = state.publisher.topology().step_queue(&definition.namespace);
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "queue_conflict",
            format!(
                "{}: {error}",
                conflict_advice(
                    &format!("the step queue {queue}"),
                    state.publisher.topology().queue_type()
                )
            ),
        ));
    }
    match state
        .db
        .bounded(|pool| templates::register(pool, definition))
        .await?
    {
        Registered::Created {
            template,
            new_namespace,
        } => {
            tracing::info!(namespace = %definition.namespace, name = %definition.name,
                version = %definition.version, "template registered");
            state
                .templates
                .forget_newest(&definition.namespace, &definition.name);
            if new_namespace {
                // Declared above unless the broker was away; then before its first step.
                if let Err(error) = state
                    .publisher
                    .ensure_namespace(&definition.namespace)
                    .await
                {
                    tracing::warn!(error = %error, namespace = %definition.namespace,
                        "cannot declare the namespace's step queue yet");
                }
                if let Err(error) = state.control.announce_namespaces().await {
                    tracing::warn!(error = format!("{error:#}"), "cannot announce namespaces");
                }
            }
            Ok((StatusCode::CREATED, template))
        }
        Registered::Identical(template) => Ok((StatusCode::OK, template)),
        Registered::Conflict(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "template_conflict",
            format!(
                "{}/{} version {} is already registered with a different definition; register it under a new version",
                definition.namespace, definition.name, definition.version
            ),
        )),
    }
}

/// Templates by namespace and name, one page at a time, each with every registered
/// version.
#[utoipa::path(
    get,
    path = "/v1/templates",
    tag = "templates",
    operation_id = "list_templates",
    params(
        ("namespace" = Option<String>, Query, description = "Only this namespace's templates."),
        ("name" = Option<String>, Query, description = "Only templates of this name (every version of one template, with `namespace`)."),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Templates per page, each with all its versions: 1 to 500; default 100."),
        ("cursor" = Option<String>, Query, min_length = 3, max_length = 193, pattern = "^[A-Za-z0-9_.-]{1,64}/[A-Za-z0-9_./-]{1,128}$", description = "The `next_cursor` of the previous page (`namespace/name` of its last template), sent with the same filters."),
    ),
    responses(
        (status = 200, description = "One page of templates.", body = TemplateList),
        (status = 400, description = "`malformed_request`: every bad or unknown query parameter.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<TemplateList>> {
    let Query(query) = query.map_err(query_rejection)?;
    let mut problems = Vec::new();
    let mut filter = templates::TemplateFilter::default();
    let mut limit = PAGE;
    let mut matches_nothing = false;
    for (key, value) in query {
        let mut problem = |message: String| {
            problems.push(json!({"path": key, "message": message}));
        };
        match key.as_str() {
            // No stored name holds U+0000 (nor can PostgreSQL compare with one).
            "namespace" | "name" if value.contains('\0') => matches_nothing = true,
            "namespace" => filter.namespace = Some(value),
            "name" => filter.name = Some(value),
            "cursor" if !valid_cursor(&value) => {
                problem("`cursor` must be a `next_cursor` from an earlier page".to_owned());
            }
            "cursor" => filter.cursor = Some(value),
            "limit" => match value.parse::<i64>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                _ => problem(format!(
                    "`limit` must be a whole number from 1 to {MAX_PAGE}"
                )),
            },
            _ => problem(format!(
                "unknown query parameter `{key}`; expected namespace, name, limit or cursor"
            )),
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::malformed("invalid query parameters").with_details(problems));
    }
    if matches_nothing {
        return Ok(Json(TemplateList {
            templates: Vec::new(),
            next_cursor: None,
        }));
    }
    let (templates, next_cursor) = state
        .db
        .bounded(|pool| templates::page(pool, &filter, limit))
        .await?;
    Ok(Json(TemplateList {
        templates,
        next_cursor,
    }))
}

/// Whether `cursor` may be one [`templates::page`] gives: `namespace/name`, in the
/// characters and lengths of a namespace and a template name. Only those, not the whole
/// rule of names (`tasker_shared::template`): a cursor is a position in byte order, and
/// the OpenAPI pattern, which clients are held to, says no more.
fn valid_cursor(cursor: &str) -> bool {
    let of_identifiers = |part: &str, max: usize, slash: bool| {
        (1..=max).contains(&part.len())
            && part.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') || (slash && c == '/')
            })
    };
    cursor.split_once('/').is_some_and(|(namespace, name)| {
        of_identifiers(namespace, 64, false) && of_identifiers(name, 128, true)
    })
}

/// One template: `?version=` or the latest.
#[utoipa::path(
    get,
    path = "/v1/templates/{namespace}/{name}",
    tag = "templates",
    operation_id = "get_template",
    params(
        ("namespace" = String, Path, description = "The template's namespace."),
        ("name" = String, Path, description = "The template's name. A `/` in it is sent percent-encoded, as `%2F` (`api_task%2Fintegration_yaml_example`)."),
        ("version" = Option<String>, Query, description = "An exact version; the highest by semver when absent."),
    ),
    responses(
        (status = 200, description = "The template.", body = TemplateRecord),
        (status = 400, description = "`malformed_request`: an unknown query parameter.", body = ErrorBody),
        (status = 404, description = "`template_not_found`.", body = ErrorBody),
        (status = 500, description = "`internal`: see the coordinator's log.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`.", body = ErrorBody),
    ),
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<TemplateRecord>> {
    requested(&state, path, query).await.map(Json)
}

/// The template `/v1/templates/{namespace}/{name}[?version=]` names (this route and its
/// diagram): the version asked, or the latest; 404 `template_not_found` otherwise.
pub(crate) async fn requested(
    state: &AppState,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<TemplateRecord> {
    let Path((namespace, name)) = path.map_err(path_rejection)?;
    let Query(query) = query.map_err(query_rejection)?;
    if let Some(unknown) = query.keys().find(|key| key.as_str() != "version") {
        return Err(ApiError::malformed(format!(
            "unknown query parameter `{unknown}`; expected `version`"
        )));
    }
    let version = query.get("version").map(String::as_str);
    // No stored name or version holds U+0000 (nor can PostgreSQL compare with one).
    let impossible = [Some(namespace.as_str()), Some(name.as_str()), version]
        .into_iter()
        .flatten()
        .any(|text| text.contains('\0'));
    let found = if impossible {
        None
    } else {
        state
            .db
            .bounded(|pool| templates::find(pool, &namespace, &name, version))
            .await?
    };
    found.ok_or_else(|| {
        ApiError::not_found(
            "template_not_found",
            match version {
                Some(version) => format!("no template {namespace}/{name} version {version}"),
                None => format!("no template {namespace}/{name}"),
            },
        )
    })
}
