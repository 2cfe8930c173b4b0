//! `POST /v1/templates`, `GET /v1/templates`, `GET /v1/templates/{namespace}/{name}`.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use super::body::body_rejection;
use super::error::{ApiError, ApiResult};
use tasker_shared::store::templates::{self, Registered, TemplateRecord};
use tasker_shared::template::{TemplateDefinition, parse_template};

/// Register a template from a YAML or JSON body.
pub(crate) async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<TemplateRecord>)> {
    let body = body.map_err(body_rejection)?;
    let text = std::str::from_utf8(&body)
        .map_err(|error| ApiError::malformed(format!("the body is not UTF-8: {error}")))?;
    let definition = parse_template(text, &state.environment).map_err(|error| {
        let details: Vec<Value> = error.0.iter().map(|p| json!(p)).collect();
        if error.0.iter().all(|p| p.code == "syntax") {
            ApiError::malformed("the body is not valid YAML or JSON").with_details(details)
        } else {
            ApiError::invalid(
                "invalid_template",
                format!("the template has {} problem(s)", details.len()),
                details,
            )
        }
    })?;
    let (status, record) = register_template(&state, &definition).await?;
    Ok((status, Json(record)))
}

/// Store a validated template; a new namespace gets its queue and is announced to workers.
/// Used by the API and by `TASKER_TEMPLATES_DIR` loading.
pub(crate) async fn register_template(
    state: &AppState,
    definition: &TemplateDefinition,
) -> ApiResult<(StatusCode, TemplateRecord)> {
    match templates::register(&state.pool, definition).await? {
        Registered::Created {
            template,
            new_namespace,
        } => {
            tracing::info!(namespace = %definition.namespace, name = %definition.name,
                version = %definition.version, "template registered");
            if new_namespace {
                state
                    .publisher
                    .ensure_namespace(&definition.namespace)
                    .await
                    .map_err(ApiError::internal)?;
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

/// Every template.
pub(crate) async fn list(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let summaries = templates::list(&state.pool).await?;
    Ok(Json(json!({"templates": summaries})))
}

/// One template: `?version=` or the latest.
pub(crate) async fn get(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<TemplateRecord>> {
    if let Some(unknown) = query.keys().find(|key| key.as_str() != "version") {
        return Err(ApiError::malformed(format!(
            "unknown query parameter `{unknown}`; expected `version`"
        )));
    }
    let version = query.get("version").map(String::as_str);
    templates::find(&state.pool, &namespace, &name, version)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(
                "template_not_found",
                match version {
                    Some(version) => format!("no template {namespace}/{name} version {version}"),
                    None => format!("no template {namespace}/{name}"),
                },
            )
        })
}
