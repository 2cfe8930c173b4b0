//! The API described as OpenAPI 3.1 ([`ApiDoc`]), served at `GET /openapi.json`.
//!
//! Each handler carries its own `#[utoipa::path]`; [`ApiDoc`] lists them and the
//! components. The tests below keep the description and the route table
//! ([`super::routes`]) equal.

use std::sync::LazyLock;

use axum::Json;
use serde_json::Value;
use utoipa::openapi::schema::{Schema, SchemaType, Type};
use utoipa::openapi::{RefOr, Required};
use utoipa::{Modify, OpenApi};

use super::analytics::{self, Bottlenecks, StepAnalytics, TemplateAnalytics};
use super::auth::SecurityDoc;
use super::body::StorableJson;
use super::bulk::{self, BulkCancelRequest, BulkResult, BulkRetryRequest, ListTag};
use super::console::{self, WhoAmI};
use super::diagram;
use super::error::{ErrorBody, ErrorDetail};
use super::health::{self, Check, Checks, Counts, Live, Ready, Status, WorkerStatus};
use super::operate::{
    self, ReadinessView, ReasonRequest, ResolveRequest, SignalView, TransitionHistory,
};
use super::schedules::{
    self, CreateScheduleRequest, ScheduleList, ScheduleView, UpdateScheduleRequest,
};
use super::tasks::{self, CreateTaskRequest, TaskPage, TaskView};
use super::templates::{
    self, TemplateDocument, TemplateList, TemplateRegistration, TemplateWarning,
};
use tasker_shared::states::{CatchUp, Overlap, StepStatus, TaskStatus};
use tasker_shared::store::analytics::{PathStep, Percentiles, StepStats, TemplateStats};
use tasker_shared::store::inspect::{ExecutionContext, StepReadiness, Transition};
use tasker_shared::store::schedules::{FireRecord, ScheduleFields, ScheduleRecord};
use tasker_shared::store::tasks::{ChildTask, StepRecord, TaskRecord};
use tasker_shared::store::templates::{TemplateRecord, TemplateSummary};
use tasker_shared::template::{StepDefinition, TemplateDefinition};

/// The coordinator's HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tasker coordinator API",
        description = "Register workflow templates, create tasks from them, follow and operate \
            them. Every error answers `{\"error\": {\"code\", \"message\", \"details\"}}` \
            (`ErrorBody`); unknown routes answer 404 with the code `route_not_found`."
    ),
    paths(
        templates::create,
        templates::list,
        templates::get,
        diagram::template,
        tasks::create,
        tasks::list,
        tasks::get,
        tasks::step,
        diagram::task,
        operate::cancel,
        operate::retry,
        operate::resolve_task,
        bulk::cancel,
        bulk::retry,
        operate::resolve,
        operate::signal,
        operate::readiness,
        operate::history,
        analytics::templates,
        analytics::steps,
        analytics::bottlenecks,
        schedules::create,
        schedules::list,
        schedules::get,
        schedules::update,
        schedules::delete,
        console::whoami,
        console::stream,
        health::live,
        health::ready,
        health::status,
        health::metrics,
        document,
    ),
    components(schemas(
        TemplateDocument,
        TemplateRecord,
        TemplateRegistration,
        TemplateWarning,
        TemplateDefinition,
        StepDefinition,
        TemplateSummary,
        TemplateList,
        CreateTaskRequest,
        TaskView,
        TaskRecord,
        TaskStatus,
        StepRecord,
        StepStatus,
        ChildTask,
        ExecutionContext,
        TemplateAnalytics,
        StepAnalytics,
        Bottlenecks,
        TemplateStats,
        StepStats,
        PathStep,
        Percentiles,
        ScheduleView,
        ScheduleList,
        ScheduleRecord,
        ScheduleFields,
        FireRecord,
        CreateScheduleRequest,
        UpdateScheduleRequest,
        Overlap,
        CatchUp,
        WhoAmI,
        TaskPage,
        ListTag,
        ReasonRequest,
        ResolveRequest,
        SignalView,
        BulkCancelRequest,
        BulkRetryRequest,
        BulkResult,
        ReadinessView,
        StepReadiness,
        TransitionHistory,
        Transition,
        Live,
        Ready,
        Status,
        Checks,
        Check,
        Counts,
        WorkerStatus,
        crate::metrics::QueueDepth,
        ErrorBody,
        ErrorDetail,
        StorableJson,
    )),
    tags(
        (name = "templates", description = "Workflow templates."),
        (name = "tasks", description = "Tasks: creating and reading them."),
        (name = "operate", description = "Operator controls and the views that explain a task."),
        (name = "schedules", description = "Tasks created on a clock."),
        (name = "analytics", description = "Figures from the stored tasks and steps."),
        (name = "console", description = "What the web console (`/ui/`) needs beside the API: the token's scopes and live events."),
        (name = "health", description = "Liveness, readiness, status and metrics."),
        (name = "meta", description = "This description."),
    ),
    modifiers(&OptionalBodies, &SecurityDoc),
)]
pub(crate) struct ApiDoc;

/// utoipa writes an optional request body (`Option<T>`) as `oneOf: [null, T]`. The
/// optional bodies of this API may be empty or absent, but never `null` (that is a 422),
/// so this keeps just `T`, in a body that stays not required.
struct OptionalBodies;

impl Modify for OptionalBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let is_null = |schema: &RefOr<Schema>| {
            matches!(schema, RefOr::T(Schema::Object(object))
                if object.schema_type == SchemaType::Type(Type::Null))
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            let bodies = operations
                .into_iter()
                .flatten()
                .filter_map(|operation| operation.request_body.as_mut())
                .filter(|body| body.required != Some(Required::True));
            for body in bodies {
                for content in body.content.values_mut() {
                    if let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema
                        && let [first, second] = one_of.items.as_slice()
                        && is_null(first) != is_null(second)
                    {
                        let kept = if is_null(first) { second } else { first };
                        content.schema = Some(kept.clone());
                    }
                }
            }
        }
    }
}

/// Built once: the description does not change while the process runs.
static DOCUMENT: LazyLock<Value> = LazyLock::new(|| {
    let mut document = serde_json::to_value(ApiDoc::openapi()).expect("the document serialises");
    require_a_criterion(&mut document);
    document
});

/// A bulk filter must narrow the tasks by at least one criterion (`{}` or only `limit`
/// is a 422): each bulk body's schema says so with `anyOf`, one branch per criterion,
/// present with its type other than `null`. utoipa's schema model has no `anyOf` beside
/// `properties`, so this edits the JSON.
fn require_a_criterion(document: &mut Value) {
    let branches: Vec<Value> = super::bulk::FILTER_FIELDS
        .iter()
        .map(|field| {
            let kind = if *field == "tags" { "array" } else { "string" };
            serde_json::json!({
                "required": [field],
                "properties": {*field: {"type": kind}},
            })
        })
        .collect();
    for request in ["BulkCancelRequest", "BulkRetryRequest"] {
        if let Some(schema) = document
            .pointer_mut(&format!("/components/schemas/{request}"))
            .and_then(Value::as_object_mut)
        {
            schema.insert("anyOf".to_owned(), Value::Array(branches.clone()));
        }
    }
}

/// This API's OpenAPI 3.1 description.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document describing this API.",
            body = serde_json::Value, content_type = "application/json"),
    ),
)]
pub(crate) async fn document() -> Json<&'static Value> {
    Json(&DOCUMENT)
}

/// The same document as pretty JSON, as `docs/openapi.json` holds it.
pub(crate) fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&*DOCUMENT).expect("the document serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    /// The methods an OpenAPI path item can hold, as its JSON keys.
    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn doc() -> Value {
        DOCUMENT.clone()
    }

    /// The document as read by an OpenAPI 3.1 parser independent of utoipa.
    fn spec() -> oas3::Spec {
        oas3::from_json(document_text()).expect("the document parses as OpenAPI 3.1")
    }

    /// Every route is described, and every description is a route.
    ///
    /// The router cannot be listed (axum has no route listing) nor probed here (its
    /// `AppState` needs a live RabbitMQ connection), so the route table is the one source
    /// of truth: `router()` is built only from `routes()` — each entry names its method
    /// once, for both the table and the handler's `MethodRouter` — and this test compares
    /// that table's `(method, path)` set with the `ApiDoc`'s, both ways. Adding a route to
    /// the table without a `#[utoipa::path]` listed in `ApiDoc` fails here, and so does a
    /// described path that is not routed (or a method or path spelled differently).
    /// [`router_is_built_only_from_the_route_table`] closes the remaining way around: a
    /// route added to the router directly, beside the table.
    #[test]
    fn every_route_is_described_and_every_description_is_routed() {
        let routed: BTreeSet<(String, String)> = super::super::routes()
            .iter()
            .map(|route| (route.method.to_string(), route.path.to_owned()))
            .collect();
        assert_eq!(
            routed.len(),
            super::super::routes().len(),
            "a route is listed twice in routes()"
        );
        let described: BTreeSet<(String, String)> = spec()
            .operations()
            .map(|(path, method, _)| (method.to_string(), path))
            .collect();
        let undescribed: Vec<_> = routed.difference(&described).collect();
        let unrouted: Vec<_> = described.difference(&routed).collect();
        assert!(
            undescribed.is_empty() && unrouted.is_empty(),
            "routes without a description in ApiDoc: {undescribed:?}; \
             descriptions in ApiDoc without a route: {unrouted:?}"
        );
    }

    /// `http/mod.rs` builds the API from `routes()` alone: it has exactly one call that
    /// adds a route (the fold over the table) and none that adds routes another way, but
    /// for the console's files (`/ui/`: files, not API calls), merged once. The router is
    /// also built, so overlapping or malformed paths in the table panic here.
    #[test]
    fn router_is_built_only_from_the_route_table() {
        let source = include_str!("mod.rs");
        assert_eq!(
            source.matches(".route(").count(),
            1,
            "http/mod.rs must add routes only by folding over routes()"
        );
        assert_eq!(
            source.matches(".merge(").count(),
            source.matches(".merge(console::routes())").count(),
            "http/mod.rs merges nothing but the console's files"
        );
        assert_eq!(source.matches(".merge(console::routes())").count(), 1);
        // Whitespace removed, so a call rustfmt split over lines is read whole.
        let console: String = include_str!("console.rs").split_whitespace().collect();
        let paths: Vec<&str> = console
            .match_indices(".route(\"")
            .map(|(at, call)| &console[at + call.len()..])
            .collect();
        assert_eq!(paths.len(), 3, "console::routes() adds three routes");
        assert!(
            paths.iter().all(|path| path.starts_with("/ui")),
            "console::routes() serves only /ui: API calls belong in routes()"
        );
        for other in [".route_service(", ".nest(", ".nest_service("] {
            assert!(
                !source.contains(other),
                "http/mod.rs adds routes with `{other}`, beside routes(): add them to routes()"
            );
        }
        let _router =
            super::super::stateless_router(1024, 4096, std::time::Duration::from_secs(60));
    }

    /// The document is OpenAPI 3.1 JSON: it reads back, unchanged, through an OpenAPI 3.1
    /// model independent of utoipa (`oas3`, which drops only the JSON Schema keyword
    /// `propertyNames`; utoipa's own types cannot read back an any-value schema `{}`,
    /// utoipa issue #1192), every reference points at a component,
    /// every operation id is unique, every path parameter is declared and every operation
    /// has a success answer and the error body for its errors.
    /// `docs/openapi.json` is the served document; after changing the API, write it
    /// again with `cargo run -p tasker-coordinator -- openapi > docs/openapi.json`.
    #[test]
    fn the_checked_in_document_is_the_served_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == document_text(),
            "docs/openapi.json differs from the API's description: run \
             `cargo run -p tasker-coordinator -- openapi > docs/openapi.json`"
        );
    }

    #[test]
    fn document_is_valid_openapi_3_1() {
        let text = document_text();
        let value: Value = serde_json::from_str(&text).expect("the document is JSON");
        let version = value["openapi"].as_str().expect("`openapi` is a string");
        assert!(version.starts_with("3.1"), "openapi is {version}");
        let spec: oas3::Spec = serde_json::from_str(&text).expect("the document is OpenAPI");
        spec.validate_version()
            .expect("the document's version is OpenAPI 3.1");
        let mut expected = value.clone();
        strip_property_names(&mut expected);
        assert_eq!(
            serde_json::to_value(&spec).expect("it serialises again"),
            expected,
            "the document changed in a serde round trip"
        );

        let schemas = value["components"]["schemas"]
            .as_object()
            .expect("components.schemas");
        let mut references = Vec::new();
        collect_refs(&value, &mut references);
        assert!(!references.is_empty());
        for reference in references {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {reference}"));
            assert!(schemas.contains_key(name), "dangling reference {reference}");
        }
        for name in [
            "TaskView",
            "TaskRecord",
            "StepRecord",
            "TemplateRecord",
            "TemplateDefinition",
            "StepReadiness",
            "Transition",
            "ExecutionContext",
            "Live",
            "Ready",
            "Status",
            "ErrorBody",
            "CreateTaskRequest",
            "Backoff",
        ] {
            assert!(schemas.contains_key(name), "component {name} is missing");
        }

        let mut operation_ids = BTreeSet::new();
        for (path, item) in value["paths"].as_object().expect("paths") {
            let in_path: BTreeSet<&str> = path
                .split('/')
                .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for method in METHODS {
                let Some(operation) = item.get(*method) else {
                    continue;
                };
                let id = operation["operationId"].as_str().expect("an operationId");
                assert!(operation_ids.insert(id), "operationId {id} is used twice");
                let declared: BTreeSet<&str> = operation["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|parameter| parameter["in"] == "path")
                    .map(|parameter| parameter["name"].as_str().expect("a name"))
                    .collect();
                assert_eq!(in_path, declared, "{method} {path}: path parameters");
                let responses = operation["responses"].as_object().expect("responses");
                assert!(
                    responses.keys().any(|status| status.starts_with('2')),
                    "{method} {path} has no success answer"
                );
                for (status, response) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert_eq!(
                            response["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ErrorBody",
                            "{method} {path} {status} is not an ErrorBody"
                        );
                    }
                }
            }
        }
    }

    /// Remove every `propertyNames` (of map schemas), which `oas3` does not model.
    fn strip_property_names(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("propertyNames");
                map.values_mut().for_each(strip_property_names);
            }
            Value::Array(items) => items.iter_mut().for_each(strip_property_names),
            _ => {}
        }
    }

    fn collect_refs(value: &Value, into: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    match (key.as_str(), inner) {
                        ("$ref", Value::String(reference)) => into.push(reference.clone()),
                        _ => collect_refs(inner, into),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| collect_refs(item, into)),
            _ => {}
        }
    }

    /// The documentation-only request bodies name exactly the fields the handlers read.
    #[test]
    fn request_schemas_match_the_fields_the_handlers_read() {
        let doc = doc();
        let fields = |schema: &str| -> BTreeSet<String> {
            doc["components"]["schemas"][schema]["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("{schema} has properties"))
                .keys()
                .cloned()
                .collect()
        };
        let set = |list: &[&str]| -> BTreeSet<String> {
            list.iter().map(|field| (*field).to_owned()).collect()
        };
        assert_eq!(fields("CreateTaskRequest"), set(tasks::CREATE_FIELDS));
        assert_eq!(fields("ReasonRequest"), set(operate::REASON_FIELDS));
        assert_eq!(fields("ResolveRequest"), set(operate::RESOLVE_FIELDS));
        assert_eq!(fields("BulkCancelRequest"), set(bulk::BULK_FIELDS));
        assert_eq!(fields("BulkRetryRequest"), set(bulk::BULK_FIELDS));
        for path in ["/v1/tasks/cancel", "/v1/tasks/retry"] {
            let body = &doc["paths"][path]["post"]["requestBody"];
            assert_eq!(body["required"], true, "{path}: the filter is required");
        }
        for path in [
            "/v1/templates/{namespace}/{name}/diagram",
            "/v1/tasks/{task_id}/diagram",
        ] {
            let content = &doc["paths"][path]["get"]["responses"]["200"]["content"];
            assert!(content.get(diagram::MERMAID).is_some(), "{path}: {content}");
        }
        assert_eq!(
            doc["components"]["schemas"]["CreateTaskRequest"]["required"],
            serde_json::json!(["namespace", "name"])
        );
        for path in [
            "/v1/tasks/{task_id}/cancel",
            "/v1/tasks/{task_id}/retry",
            "/v1/tasks/{task_id}/steps/{step_name}/resolve",
        ] {
            let body = &doc["paths"][path]["post"]["requestBody"];
            assert_ne!(body["required"], true, "{path}: the body is optional");
            let schema = &body["content"]["application/json"]["schema"];
            assert!(schema.get("$ref").is_some(), "{path}: {schema}");
        }
        let templates = &doc["paths"]["/v1/templates"]["post"]["requestBody"]["content"];
        assert!(templates.get("application/yaml").is_some());
        assert!(templates.get("application/json").is_some());
        let metrics = &doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"];
        assert!(
            metrics.get(tasker_shared::metrics::CONTENT_TYPE).is_some(),
            "/metrics is described with another content type than it answers"
        );
    }

    /// `GET /openapi.json` answers the `ApiDoc`.
    #[tokio::test]
    async fn openapi_json_serves_the_api_doc() {
        let Json(served) = document().await;
        assert_eq!(serde_json::to_value(served).expect("serialises"), doc());
    }
}
